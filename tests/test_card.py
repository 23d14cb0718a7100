"""The model card: metadata the Hub reads, the DPE tables and images, evaluation results, and escaping."""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import RUNTIME_FILES
from huggingface_hub import ModelCard

from dpe_export.calibration import result as calib_result
from dpe_export.errors import DPEExportError
from dpe_export.evaluation import results
from dpe_export.export import card
from dpe_export.modeling_templates import dpe_params
from dpe_export.sources import checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CALIBRATION = {
    "groups": [[0, 4], [4, 8]],
    "scales": [1, 2, 4, 8],
    "grid": [[0.1, 0.5, 0.9, 0.3], [0.2, None, 0.7, 0.8]],
    "chosen": [4, 8],
    "metric": "passkey accuracy",
    "length": 256,
}

# Quotes, newlines, YAML document markers and flow syntax, Markdown table/code/link/heading syntax, HTML,
# Python string and code-fence breakers, Unicode line separators and a C1 control.
HOSTILE = (
    "x\" 'y'\n---\nkey: [1, {a: b}] # | `code` ``` \"\"\" ''' <script>alert(1)</script> [l](http://e) "
    "\u2028\x85 $x$ \\"
)


def export_with(model_dir, out, *, selected=None, base_model=None, repo_id=None, calibration=None, eval_records=None):
    from dpe_export.export import convert as export_convert
    from dpe_export.sources import checkpoint

    info = checkpoint.inspect_model(model_dir)
    params = export_convert.build_params(info, local_window_size=8, scale_factors=[2, 4], target_length=256)
    return export_convert.convert(info, out, params, selected, base_model=base_model, repo_id=repo_id,
                          calibration=calibration, eval_records=eval_records)


def eval_records(base: Path, dpe: Path) -> list[dict]:
    recs = []
    for model, acc in ((base, [1.0, 0.25]), (dpe, [1.0, 0.75])):
        for length, a in zip((64, 256), acc):
            for depth in (0.0, 1.0):
                recs.append({"task": "passkey", "model": str(model), "method": "none", "seed": 0, "length": length,
                             "depth": depth, "accuracy": a, "samples": 4})
    return recs


def front_matter_text(text: str) -> str:
    assert text.startswith("---\n")
    return text.split("\n---\n", 1)[0][4:]


def python_snippet(text: str) -> str:
    m = re.search(r"```python\n(.*?)\n```", text, re.S)
    assert m
    return m.group(1)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_card_renders_for_each_family(tiny_dirs, tmp_path, family):
    base = tiny_dirs(family)
    selected = torch.zeros(2, 4, 8, dtype=torch.bool)
    selected[..., 5:] = True
    out = export_with(base, tmp_path / f"{family}-dpe", selected=selected, base_model=f"org/{family}-base",
                      repo_id=f"my-org/{family}-dpe", calibration=CALIBRATION,
                      eval_records=eval_records(base, tmp_path / f"{family}-dpe"))
    text = (out / "README.md").read_text(encoding="utf-8")
    meta = ModelCard.load(out / "README.md").data.to_dict()
    assert meta["base_model"] == f"org/{family}-base"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert set(meta["tags"]) >= {"dpe", "long-context", "rope", "custom_code"}
    assert meta["context_length"] == 256
    assert "license" not in meta  # the tiny base models say nothing about a license

    assert "# my-org/" in text and f'repo = "my-org/{family}-dpe"' in text
    compile(python_snippet(text), "snippet", "exec")
    # parameter table: group, frequencies, wavelengths, scale, effective distance w + s * (L - w), share selected
    assert "| 0 | 0–3 |" in text and "| 1 | 4–7 |" in text
    assert "| 2 | 120 |" in text and "| 4 | 232 |" in text  # 8 + 2 * (64 - 8), 8 + 4 * (64 - 8)
    assert "| 75% |" in text  # frequencies 5..7 of group 1 selected
    # calibration table with the chosen cells in bold, evaluation table base vs DPE
    assert "| 0 | 0–3 | 0.1 | 0.5 | **0.9** | 0.3 |" in text and "| 1 | 4–7 | 0.2 | – | 0.7 | **0.8** |" in text
    assert "| Length | base | DPE |" in text and "| 256 | 25.0% | 75.0% |" in text
    for needle in ("flash_attention_2", "trust_remote_code=True", "transformers>=5", "## Limitations",
                   "2504.18857", "2410.08703"):
        assert needle in text, needle
    for image in (card.CALIBRATION_IMAGE, card.SELECTION_IMAGE):
        assert f"]({image})" in text
        assert (out / image).read_bytes().startswith(PNG_MAGIC)


def test_hostile_names_and_license_cannot_break_the_card_or_the_code(tiny_dirs, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for f in tiny_dirs("llama").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    meta = yaml.safe_dump({"license": HOSTILE, "license_name": HOSTILE, "license_link": "javascript:alert(1)"})
    (base / "README.md").write_text(f"---\n{meta}---\n# base\n", encoding="utf-8")
    out_name = "evil" + HOSTILE.replace("/", "_").replace("\\", "_").replace("\n", "_")
    records = [{"task": HOSTILE, "model": HOSTILE, "method": HOSTILE, "length": 64, "accuracy": 0.5, "samples": 2},
               {"task": HOSTILE, "model": str(base), "method": "none", "length": 64, "accuracy": 0.25, "samples": 2}]
    out = export_with(base, tmp_path / out_name, base_model=HOSTILE, calibration={**CALIBRATION, "metric": HOSTILE},
                      eval_records=records)
    text = (out / "README.md").read_text(encoding="utf-8")

    # YAML: the front matter is one document that parses, with the values intact and the license made safe
    fm = front_matter_text(text)
    parsed = yaml.safe_load(fm)
    assert parsed["base_model"] == HOSTILE
    assert parsed["license"] == "other" and "license_name" not in parsed and "license_link" not in parsed
    assert ModelCard.load(out / "README.md").data.to_dict()["base_model"] == HOSTILE
    assert text.count("\n---\n") == 1 and not any(c in fm for c in "\u2028\x85")
    # Markdown: hostile text stays on its line, with no raw HTML, table pipes, code spans or links
    body = text.split("\n---\n", 1)[1]
    prose = body.replace(python_snippet(text), "")
    assert "<script>" not in body and "`code`" not in prose and "[l](http" not in prose and "$x$" not in prose
    assert not any(c in body for c in "\u2028\x85")
    for line in body.splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line)
            assert len(cells) == len(re.split(r"(?<!\\)\|", _table_header_for(body, line))), line
    assert "The weights are the base model's, under its license: x" in body  # the license text, escaped
    # Python: the snippet compiles and its string is the exact name
    snippet = python_snippet(text)
    compile(snippet, "snippet", "exec")
    assert ast.literal_eval(snippet.split("repo = ", 1)[1].split("  #", 1)[0]) == "path/to/" + out_name
    assert "`" not in snippet
    # the generated code never sees these values
    for name in ("modeling_dpe.py", *RUNTIME_FILES):
        code = (out / name).read_text(encoding="utf-8")
        compile(code, name, "exec")
        assert "evil" not in code and "<script>" not in code and "alert" not in code
    for name in RUNTIME_FILES:
        assert (out / name).read_bytes() == (REPO_ROOT / "modeling_templates" / name).read_bytes()
    assert json.loads((out / "config.json").read_text())["dpe"]["local_window_size"] == 8


def _table_header_for(body: str, row: str) -> str:
    """The header line of the Markdown table that `row` belongs to."""
    lines = body.splitlines()
    i = lines.index(row)
    while i > 0 and lines[i - 1].startswith("|"):
        i -= 1
    return lines[i]


@pytest.mark.parametrize("value", [HOSTILE, "", "plain", "\x00\x1f\x7f\x9f\ud800\ufeff", "a: b\n- c", "'\"\\"])
def test_escaping_filters(value):
    assert yaml.safe_load(f"k: {card.yaml_str(value)}\n")["k"] == value
    md = card.md_text(value)
    assert "\n" not in md and "<" not in md and re.search(r"(?<!\\)[|`\[\]]", md) is None
    py = card.py_str(value)
    assert ast.literal_eval(py) == value and "`" not in py and py.isascii()


def test_license_from_the_base_models_card_or_config(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n---\n# card\n", encoding="utf-8")
    assert checkpoint.read_base_license(tmp_path) == {"license": "other", "license_name": "llama3", "license_link": "LICENSE"}
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n", encoding="utf-8")
    assert checkpoint.read_base_license(tmp_path) == {"license": "apache-2.0"}
    (tmp_path / "README.md").write_text("no front matter\n", encoding="utf-8")
    assert checkpoint.read_base_license(tmp_path, {"license": "mit"}) == {"license": "mit"}
    assert checkpoint.read_base_license(tmp_path, {}) == {}
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n", encoding="utf-8")
    assert checkpoint.read_base_license(tmp_path) == {}


def test_effective_distance():
    assert card.effective_distance(1024, 1, 8192) == 8192
    assert card.effective_distance(1024, 8, 8192) == 1024 + 8 * (8192 - 1024)


def test_calibration_shapes_are_checked(tmp_path):
    norm = calib_result.normalize_calibration({"groups": [0, 4, 8], "scales": [1, 2], "grid": [[1, 2], [3, None]]})
    assert norm["groups"] == [[0, 4], [4, 8]] and norm["chosen"] is None and norm["higher_is_better"]
    bad = [
        [],
        {"groups": [0, 4], "scales": [1, 2], "grid": [[1]]},
        {"groups": [0, 4], "scales": [0, 2], "grid": [[1, 2]]},
        {"groups": [[4, 0]], "scales": [1], "grid": [[1]]},
        {"groups": [0, 4], "scales": [1], "grid": [["x"]]},
        {"groups": [0, 4], "scales": [1], "grid": [[1]], "chosen": [1, 2]},
    ]
    for data in bad:
        with pytest.raises(ValueError):
            calib_result.normalize_calibration(data)
    with pytest.raises(ValueError, match="model has 8"):
        calib_result.normalize_calibration({"groups": [0, 16], "scales": [1], "grid": [[1]]}, num_freqs=8)
    path = tmp_path / "calibration.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DPEExportError, match="cannot read calibration"):
        calib_result.load_calibration(path)


def test_eval_results_in_any_shape(tmp_path):
    base, dpe = tmp_path / "base", tmp_path / "base-dpe"
    recs = eval_records(base, dpe)
    as_result = {"task": "passkey", "model": str(base), "method": "none", "records": [
        {k: v for k, v in r.items() if k not in ("task", "model", "method")} for r in recs if r["model"] == str(base)]}
    ppl = {"task": "ppl", "model": str(dpe), "method": "none", "records": [
        {"length": 64, "depth": None, "accuracy": None, "samples": 2, "perplexity": 9.0, "tokens": 100,
         "nll": 100 * 2.0}]}
    for data in (recs, {"records": recs}, [as_result, {"records": [r for r in recs if r["model"] == str(dpe)]}]):
        tables = card.eval_tables(results.eval_records(data))
        assert tables[0]["columns"] == ["base", "DPE"], data
        assert [r["cells"] for r in tables[0]["rows"]] == [["100.0%", "100.0%"], ["25.0%", "75.0%"]]
    tables = card.eval_tables(results.eval_records(ppl))
    assert tables[0]["metric"].startswith("perplexity") and tables[0]["rows"][0]["cells"] == ["7.39"]  # exp(2)
    on_the_fly = card.eval_tables([{"task": "passkey", "model": str(base), "method": "dpe:8,2,4", "length": 64,
                                    "accuracy": 1.0, "samples": 1}, *recs[:4]], base_dir=base)
    assert on_the_fly[0]["columns"] == ["base", "dpe:8,2,4"]
    for i, data in enumerate(([], {"records": "x"}, [{"no": "length"}])):
        (tmp_path / f"e{i}.json").write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(DPEExportError, match="no evaluation records"):
            results.load_eval_records([tmp_path / f"e{i}.json"])


def test_the_card_and_the_cli_table_read_one_aggregation():
    """results.comparison_tables (the card) and format_table / overall (the CLI, the JSON) merge records the same
    way: RULER's average, and a perplexity from the summed nll (not a record's own, possibly rounded, number)."""
    ruler = results.EvalResult("ruler", "./m", "none", 0, [
        {"subtask": s, "length": n, "depth": None, "accuracy": a, "samples": 3}
        for s, n, a in (("vt", 2048, 0.1), ("cwe", 2048, 1 / 3), ("vt", 4096, 0.7))])
    (table,) = results.comparison_tables(results.eval_records(ruler.to_dict()))
    rows = {r["length"]: r["cells"] for r in table["rows"]}
    overall = {o["length"]: o for o in ruler.overall()}
    assert rows["average @ 2,048"] == [results.format_accuracy(overall[2048]["accuracy"])] == ["21.7%"]
    assert rows["average @ 4,096"] == ["70.0%"] and "21.7%" in results.format_table(ruler)
    ppl = results.EvalResult("ppl", "./m", "none", 0, [
        {"length": 64, "depth": None, "accuracy": None, "samples": 2, "perplexity": 9.0, "tokens": 100, "nll": 200.0}])
    (table,) = results.comparison_tables(results.eval_records(ppl.to_dict()))
    assert table["rows"][0]["cells"] == ["7.39"] and table["metric"] == "perplexity (lower is better)"
    assert ppl.overall()[0]["perplexity"] == pytest.approx(7.389, abs=1e-3)
    assert results.format_table(ppl).splitlines()[-1].split() == ["64", "2", "100", "7.389"]


def test_without_matplotlib_the_card_has_tables_and_a_warning(llama_dir, tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    selected = torch.ones(2, 4, 8, dtype=torch.bool)
    with caplog.at_level("WARNING", logger="dpe_export"):
        out = export_with(llama_dir, tmp_path / "out", selected=selected, calibration=CALIBRATION)
    assert "matplotlib is not installed" in caplog.text
    text = (out / "README.md").read_text(encoding="utf-8")
    assert not list(out.glob("*.png")) and ".png)" not in text
    assert "**0.9**" in text


def test_convert_reads_calibration_and_the_eval_files_beside_it(run_cli, llama_dir, tmp_path):
    cal_dir = tmp_path / "calib"
    cal_dir.mkdir()
    (cal_dir / "calibration.json").write_text(json.dumps(CALIBRATION), encoding="utf-8")
    out = tmp_path / "out"
    recs = eval_records(llama_dir, out)
    (cal_dir / "eval-base.json").write_text(json.dumps({"records": recs[:4]}), encoding="utf-8")
    (cal_dir / "eval-dpe.json").write_text(json.dumps(recs[4:]), encoding="utf-8")
    r = run_cli("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "2,4",
                "--calibration", cal_dir / "calibration.json", "--repo-id", "my-org/tiny-dpe")
    assert r.exit_code == 0, r.stderr
    text = (out / "README.md").read_text(encoding="utf-8")
    assert "## Calibration" in text and "## Evaluation" in text and "| 256 | 25.0% | 75.0% |" in text
    assert 'repo = "my-org/tiny-dpe"' in text


def test_convert_refuses_a_bad_calibration_or_eval_file_before_writing(run_cli, llama_dir, tmp_path):
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"groups": [0, 4], "scales": [1], "grid": [[1, 2]]}), encoding="utf-8")
    out = tmp_path / "out"
    r = run_cli("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "2,4", "--calibration", bad)
    assert r.exit_code == 1 and "calibration" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "2,4",
                "--eval-json", tmp_path / "missing.json")
    assert r.exit_code != 0 and "missing.json" in r.stderr
    r = run_cli("convert", llama_dir, "-o", out, "--window", "8", "--scale-factors", "2,4", "--repo-id", "bad id")
    assert r.exit_code == 1 and "repo-id" in r.stderr
    assert not out.exists()


def test_the_cards_snippet_runs_as_written_and_names_the_repo_when_known(tmp_path):
    """Extract the card's Python snippet from a testbed export and run it (placeholder replaced by the path)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from dpe_export.export import convert as export_convert

    testbed = Path(__file__).resolve().parent / "fixtures" / "testbed-llama"
    params = dpe_params.DPEParams(32, [8, 16, 32, 32], [0, 4, 8, 12, 16], target_length=4096)
    out = export_convert.convert(testbed, tmp_path / "tb-dpe", params)
    card = (out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert 'repo = "path/to/tb-dpe"  # placeholder' in snippet
    snippet = snippet.replace('"path/to/tb-dpe"', repr(str(out)))
    res = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    named = export_convert.convert(testbed, tmp_path / "named", params, repo_id="my-org/tb-dpe")
    card = (named / "README.md").read_text()
    assert "# my-org/tb-dpe" in card and 'repo = "my-org/tb-dpe"\n' in card
