"""Check every way a user might load a DPE export into vLLM, with the dpe-export plugin and without it.

Without the plugin (VLLM_PLUGINS=''), vLLM runs its own attention and paged KV cache, which do not apply DPE: every
way in must fail in one line (its Transformers backend, chosen automatically for remote code or with
model_impl="transformers"; an `hf_overrides` architecture override to the family's native vLLM model; loading
without trust_remote_code). With the plugin (dpe_export.serving.vllm, installed with the package), the default
load and the load without trust_remote_code are served by the plugin's DPE model (the architecture is printed),
and the two ways around it (model_impl="transformers", an architecture override) are still refused.

Run it in the vLLM venv (scripts/vllm_env.sh builds one):

    PY=$(bash scripts/vllm_env.sh | tail -n 1)
    dpe-export convert --model tests/fixtures/testbed-llama -o /tmp/testbed-dpe --window 32 \
        --scale-factors 128,128,64,8 --target-length 4096
    VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 $PY scripts/vllm_refusal.py /tmp/testbed-dpe

Each attempt runs in a subprocess of its own (vLLM keeps global state); exit status 0 only when every attempt
ends as expected. tests/test_vllm_plugin.py asserts the same outcomes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ATTEMPTS = {
    "auto (remote code -> Transformers backend)": {"trust_remote_code": True},
    "model_impl='transformers'": {"trust_remote_code": True, "model_impl": "transformers"},
    "hf_overrides architectures=[LlamaForCausalLM]": {"trust_remote_code": True,
                                                        "hf_overrides": {"architectures": ["LlamaForCausalLM"]}},
    "without trust_remote_code": {},
}

# (plugin on, attempt) -> served by the plugin's DPE model (True) or refused (False)
SERVED_WITH_PLUGIN = {"auto (remote code -> Transformers backend)": True, "without trust_remote_code": True}

CHILD = r"""
import json, sys
from vllm import LLM, SamplingParams
kwargs = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=1024, enforce_eager=True, **kwargs)
out = llm.generate(["a b c"], SamplingParams(max_tokens=4, temperature=0))
print("SERVED:", llm.llm_engine.model_config.architecture, repr(out[0].outputs[0].text))
"""


def attempt(export: str, kwargs: dict, plugin: bool, should_serve: bool) -> tuple:
    env = dict(os.environ) if plugin else dict(os.environ, VLLM_PLUGINS="")
    proc = subprocess.run([sys.executable, "-c", CHILD, export, json.dumps(kwargs)], capture_output=True, text=True,
                          env=env)
    text = proc.stdout + proc.stderr
    dpe = next((line for line in text.splitlines() if "This is a DPE export" in line), None)
    unknown = "contains custom code" in text or "does not recognize this architecture" in text
    served = next((line for line in proc.stdout.splitlines() if line.startswith("SERVED:")), None)
    if served:
        if should_serve and " DPE" in served:
            return True, "served by the plugin: " + served[len("SERVED: "):]
        return False, "SERVED (wrong: " + ("not by the plugin's DPE model" if should_serve else
                                           "this way vLLM does not run DPE") + "): " + served
    if should_serve:
        return False, "not served: " + (text.strip().splitlines() or ["?"])[-1][:200]
    if dpe:
        return True, "refused: This is a DPE export" + dpe.split("This is a DPE export", 1)[1][:140]
    if unknown and not kwargs.get("trust_remote_code"):
        return True, "refused: the config is the export's own code, and transformers asks for trust_remote_code"
    return False, "failed another way: " + (text.strip().splitlines() or ["?"])[-1][:200]


def main() -> int:
    export = sys.argv[1]
    ok = True
    for plugin in (False, True):
        print("with the dpe-export plugin:" if plugin else "without the plugin (VLLM_PLUGINS=''):", flush=True)
        for name, kwargs in ATTEMPTS.items():
            t0 = time.time()
            good, verdict = attempt(export, kwargs, plugin, plugin and SERVED_WITH_PLUGIN.get(name, False))
            ok = ok and good
            print(f"  {name}: {verdict} ({time.time() - t0:.0f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
