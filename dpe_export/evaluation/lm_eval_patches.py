"""Every change dpe-export makes to other libraries' globals while lm-evaluation-harness runs, in one place.

dpe-export runs lm-eval's own task code (RULER, or any task given with ``--harness lm-eval``). Six globals of
other libraries are replaced for the duration of a run, each for one reason; :func:`patched` applies them and
puts every one back when the run ends, however it ends (``PATCHES`` lists them, and a test checks that a run
applies exactly these and leaves every one as it found it, after a run and after an exception):

1. ``transformers.AutoTokenizer.from_pretrained`` (RULER): RULER's data generators load the tokenizer again by name
   with ``trust_remote_code=True``, which would run a base model's own code. They are given a name that is new
   for every run (so nothing an earlier run cached is reused) and get dpe-export's tokenizer object for it; any
   other name is refused.
2. ``requests.get`` (RULER's QA subtasks, with ``--data-file``): they download SQuAD / HotpotQA JSON at run time;
   the URLs whose file was given are answered from that file, every other URL goes to the real ``requests.get``.
3. ``datasets.load_dataset`` (RULER's essay subtasks, when the dataset is in the local Hugging Face cache): offline,
   ``load_dataset(NAME)`` reads only datasets' own processed cache; a snapshot in the hub cache (what
   ``huggingface-cli download`` leaves) is loaded from its directory instead.
4. ``sys.modules['lm_eval.tasks.ruler.*']`` (RULER, before every (subtask, length) cell): RULER's generator modules
   are forgotten so that the next cell imports them afresh, as a new process would (cwe keeps a module-level
   random generator: without this the second model compared in one process gets other prompts than the first).
   The costly ``prepare_niah`` is kept and its functools caches are emptied instead (a haystack read from data
   given to an earlier run, say). When the run ends the entries that were there before it are put back;
   modules first imported during the run stay imported, as after any import.
5. ``nltk.download`` (RULER): importing ``prepare_niah`` calls ``nltk.download("punkt_tab")`` when the data is
   missing, which fails or waits on an offline machine. Only the essay subtasks read that data, and they are
   refused without it before anything runs; the other subtasks never use it. It becomes a no-op.
6. ``lm_eval.evaluator.add_env_info`` (every run): every ``simple_evaluate`` call runs ``pip list`` and other
   commands for an environment report (about a second a call here) that dpe-export's records never read. It
   becomes a no-op.

Nothing else of another library is changed: lm-eval's loggers are set to ERROR (:func:`dpe_export.evaluation.
harness.quiet_lm_eval`), which is configuration, not a patch.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from dpe_export.errors import DPEExportError


@dataclass(frozen=True)
class Patch:
    """One global replaced while lm-eval runs: what, when, and why (the module docstring says more)."""

    target: str
    when: str
    why: str


PATCHES = (
    Patch("transformers.AutoTokenizer.from_pretrained", "RULER",
          "its generators get dpe-export's tokenizer object, never one loaded by name with trust_remote_code"),
    Patch("requests.get", "RULER QA subtasks with --data-file", "their JSON comes from the given files"),
    Patch("datasets.load_dataset", "RULER essay subtasks with the dataset in the local cache",
          "a hub-cache snapshot is read from its directory, with no network"),
    Patch("sys.modules[lm_eval.tasks.ruler.*]", "RULER, before every cell",
          "generator modules imported afresh: the same prompts for every model compared in one process"),
    Patch("nltk.download", "RULER", "importing prepare_niah stays off the network"),
    Patch("lm_eval.evaluator.add_env_info", "every run", "no pip list per simple_evaluate call"),
)

TOKENIZER_KEY = "dpe-export-tokenizer"
RULER_MODULES = "lm_eval.tasks.ruler."
# RULER modules kept from one cell to the next: importing prepare_niah builds and sorts every adjective-noun pair
# (seconds per import on 2 CPU cores) and it holds no state but its functools caches, which are emptied instead.
KEPT_RULER_MODULES = ("lm_eval.tasks.ruler.prepare_niah",)

_KEYS = itertools.count()
_MISSING = object()


class _Response:
    """What ``requests.get(url).json()`` needs: a response whose JSON is a local file's."""

    def __init__(self, data):
        self._data = data

    def raise_for_status(self):
        return None

    def json(self):
        return self._data


class LmEvalPatches:
    """The patches of one run (see :func:`patched`): which were applied, RULER's tokenizer name, and the per-cell
    refresh of RULER's modules."""

    def __init__(self, stack: contextlib.ExitStack):
        self._stack = stack
        self.applied: list[str] = []
        self.tokenizer_key: Optional[str] = None
        self._ruler_modules = False

    def replace(self, target: str, owner: Any, name: str, value: Any) -> None:
        """``owner.name`` is ``value`` until the run ends, then exactly what it was (a class's classmethod too)."""
        assert target in {p.target for p in PATCHES}, f"{target} is not in PATCHES"
        original = vars(owner).get(name, _MISSING)
        setattr(owner, name, value)
        self._stack.callback(_restore, owner, name, original)
        self.applied.append(target)

    def fresh_ruler_modules(self) -> None:
        """Patch 4: the next lm-eval run imports RULER's generator modules as a new process would."""
        if not self._ruler_modules:
            raise RuntimeError("fresh_ruler_modules() needs patched(ruler_tokenizer=...)")
        for name in [n for n in sys.modules if n.startswith(RULER_MODULES)]:
            if name not in KEPT_RULER_MODULES:
                del sys.modules[name]
                continue
            for value in list(vars(sys.modules[name]).values()):
                if isinstance(value, functools._lru_cache_wrapper):
                    value.cache_clear()

    def _keep_ruler_modules(self) -> None:
        before = {n: m for n, m in sys.modules.items() if n.startswith(RULER_MODULES)}
        self._stack.callback(_restore_modules, before)
        self._ruler_modules = True
        self.applied.append("sys.modules[lm_eval.tasks.ruler.*]")


def _restore(owner: Any, name: str, original: Any) -> None:
    if original is _MISSING:
        delattr(owner, name)
    else:
        setattr(owner, name, original)


def _restore_modules(before: Mapping[str, Any]) -> None:
    """Put back the RULER modules there were before the run, also as attributes of their package."""
    for name, module in before.items():
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)


def _tokenizer_from_pretrained(tokenizer, key: str) -> Callable[..., Any]:
    def from_pretrained(name, *args, **kwargs):
        if str(name) != key:
            raise DPEExportError(f"lm-eval asked to load the tokenizer {name!r} by name while RULER ran; "
                                 "dpe-export gives it the model's own only")
        return tokenizer

    return from_pretrained


def _local_get(original: Callable[..., Any], files: Mapping[str, Path]) -> Callable[..., Any]:
    def get(url, *args, **kwargs):
        for tail, path in files.items():
            if str(url).endswith(tail):
                return _Response(json.loads(Path(path).read_text(encoding="utf-8")))
        return original(url, *args, **kwargs)

    return get


def _local_load_dataset(original: Callable[..., Any], snapshots: Mapping[str, str]) -> Callable[..., Any]:
    def load_dataset(path, *args, **kwargs):
        return original(snapshots.get(path, path) if isinstance(path, str) else path, *args, **kwargs)

    return load_dataset


@contextlib.contextmanager
def patched(*, ruler_tokenizer=None, local_json: Optional[Mapping[str, Path]] = None,
            hf_snapshots: Optional[Mapping[str, str]] = None) -> Iterator[LmEvalPatches]:
    """The patches one lm-eval run needs, for the duration (see the module docstring).

    ``ruler_tokenizer``: a RULER run with this tokenizer (patches 1, 4, 5; pass ``patches.tokenizer_key`` to
    RULER's task metadata and call ``patches.fresh_ruler_modules()`` before each cell). ``local_json``: URL
    tail -> JSON file answering it (patch 2). ``hf_snapshots``: dataset repo -> its snapshot directory
    (patch 3). Patch 6 is always applied.
    """
    import lm_eval.evaluator as evaluator

    with contextlib.ExitStack() as stack:
        patches = LmEvalPatches(stack)
        if ruler_tokenizer is not None:
            from transformers import AutoTokenizer

            patches.tokenizer_key = f"{TOKENIZER_KEY}-{next(_KEYS)}"
            patches.replace("transformers.AutoTokenizer.from_pretrained", AutoTokenizer, "from_pretrained",
                            _tokenizer_from_pretrained(ruler_tokenizer, patches.tokenizer_key))
        if local_json:
            import requests

            patches.replace("requests.get", requests, "get", _local_get(requests.get, dict(local_json)))
        if hf_snapshots:
            import datasets

            patches.replace("datasets.load_dataset", datasets, "load_dataset",
                            _local_load_dataset(datasets.load_dataset, dict(hf_snapshots)))
        if ruler_tokenizer is not None:
            patches._keep_ruler_modules()
            with contextlib.suppress(ImportError):
                import nltk

                patches.replace("nltk.download", nltk, "download", lambda *args, **kwargs: False)
        patches.replace("lm_eval.evaluator.add_env_info", evaluator, "add_env_info", lambda storage: None)
        yield patches
