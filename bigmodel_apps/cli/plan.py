"""``bigmodel plan``: per-device memory and collective traffic of an AdamW training step on a
mesh, from the model config alone (``bigmodel_train.plan``; nothing is allocated)."""

from __future__ import annotations

import argparse
import json
import textwrap

from bigmodel_apps.cli.parsing import positive_int


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="memory planner: per-device bytes and collectives of a training step on a mesh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Per device: bytes for parameters (float32 master weights), gradients, AdamW state
            and activations (under the remat policy), the total against the device's memory,
            the largest global batch that fits, and the collective bytes per step (all-gather
            for fsdp; all-reduce for data, tensor and the fsdp gradients, which XLA:CPU compiles
            as all-reduce + slice where GPUs / TPUs reduce-scatter). Pure arithmetic on
            the preset's shapes: llama-2-7b on 64 devices plans in a second.

            examples:
              bigmodel plan llama-2-7b --mesh fsdp=8 --batch 8 --seq-len 4096 --dtype bfloat16 --remat full
              bigmodel plan gpt2-xl --mesh data=1 --batch 8 --seq-len 1024 --device h200 --json"""),
    )
    p.add_argument("preset", metavar="PRESET", help="model preset (reference_numpy.configs.PRESETS)")
    p.add_argument("--mesh", default="data=1",
                   help="mesh sizes, e.g. fsdp=8 or data:2,fsdp:2,tensor:2 (default one device)")
    p.add_argument("--batch", type=positive_int, required=True, help="global batch size (examples per step)")
    p.add_argument("--seq-len", type=positive_int, required=True, help="tokens per example")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16 (default float32)")
    p.add_argument("--remat", default="none", help="remat policy: none, full, dots, dots_no_batch (default none)")
    p.add_argument("--device", default="h200", help="h200, h100, a100-80g, tpu-v5e or cpu (default h200)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from bigmodel_jax.sharding import parse_mesh
    from bigmodel_train.plan import format_plan, plan

    result = plan(args.preset, parse_mesh(args.mesh), args.batch, args.seq_len, dtype=args.dtype,
                  remat=args.remat, device=args.device)
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_plan(result))
    return 0
