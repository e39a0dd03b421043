"""Reproduce FlashInfer's workspace failure from a layer plan, on the installed release (0.7.2.post1:
"workspace insufficient for combine payload region"; 0.7.4: "Dispatch payload exceeds its workspace capacity").

    python examples/repro_from_plan.py                      # the measured NVFP4-then-bf16 plan, built below
    python examples/repro_from_plan.py examples/plans/deepseek-v3-r1-nvfp4-mtp.json
    python examples/repro_from_plan.py PLAN.json --manager mutant:first_call_wins --ep 2
    python examples/repro_from_plan.py PLAN.json --backend flashinfer   # on >= ep NVLink GPUs

Three steps, each one the CLI command of the same name: ``explain`` (the arithmetic: which layer,
which offset, how many bytes short), ``predict`` (the smallest runtime batch that fails) and
``repro`` (a real rank world: sim on CPU, FlashInfer on GPUs, first failure exactly as FlashInfer
raises it). The script exits with ``repro``'s status (0 no failure, 1 reproduced, 2 bad input,
3 the world failed) and says whether the arithmetic and the run agree.

Without a plan argument it builds one in Python, the way a test or a Hypothesis failure would, and
saves it as JSON: the commands take any ``ModelPlan`` JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from pytest_mnnvl.cli.main import main as cli
from pytest_mnnvl.model.layers import LayerSpec, ModelPlan, QuantFormat


def facts_plan() -> ModelPlan:
    """An NVFP4 layer sizes the workspace, then a bf16 MTP head of the same shape (H=4096, top_k=2, T=256)."""

    def layer(quant: QuantFormat, name: str) -> LayerSpec:
        return LayerSpec(quant, hidden_size=4096, top_k=2, num_experts=8, max_num_tokens=256, name=name)

    return ModelPlan.single_stage(
        [layer(QuantFormat.NVFP4, "base")],
        mtp_head=[layer(QuantFormat.BF16, "head")],
        name="facts-nvfp4-then-bf16",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plan", nargs="?", help="a ModelPlan JSON file (default: an NVFP4 layer, then a bf16 MTP head)")
    parser.add_argument("--manager", default="mutant:first_call_wins", help="manager spec (default: the bug)")
    parser.add_argument("--ep", default="2")
    parser.add_argument("--backend", default="sim", choices=("sim", "flashinfer"))
    args = parser.parse_args(argv)

    path = args.plan
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="mnnvl-plan-"), "facts-nvfp4-then-bf16.json")
        facts_plan().save(path)
        print(f"# wrote {path}")
    common = [path, "--manager", args.manager, "--ep", args.ep]

    print("\n# 1. explain: the arithmetic of every layer on the workspace the manager holds")
    explained = cli(["explain", *common])
    print("\n# 2. predict: the smallest runtime batch at which each layer fails")
    cli(["predict", *common])
    print(f"\n# 3. repro: the plan on a real {args.backend} world")
    sys.stdout.flush()
    reproduced = cli(["repro", *common, "--backend", args.backend])

    if explained in (0, 1) and reproduced in (0, 1):
        agree = "agree" if explained == reproduced else "DISAGREE (please report it with the plan)"
        said = "fail" if explained else "fit"
        print(f"\n# explain said {said}, repro {'failed' if reproduced else 'passed'}: {agree}")
    return reproduced


if __name__ == "__main__":
    sys.exit(main())
