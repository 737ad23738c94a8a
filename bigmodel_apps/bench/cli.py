"""Command line of the benchmark suite: ``bigmodel bench`` and ``python benchmarks/bench.py``
(the same parser and the same code).

One workload::

    bigmodel bench --preset bert-base --batch 8 --seq-len 128 --out benchmarks/results/local
    bigmodel bench --preset gpt2 --kinds decode --sides jax torch --decode-new-tokens 64
    bigmodel bench --preset bert-base --sides jax --kinds forward --onnx   # + onnxruntime

A named plan (several runs plus the issue's targets in ``targets-<plan>.md``)::

    bigmodel bench --plan smoke --out /tmp/bench          # seconds: proves everything runs
    bigmodel bench --plan cpu-targets --out benchmarks/results/cpu
    bigmodel bench --plan gpu --out "$OUT"                # benchmarks/gpu.sh

The training step on device meshes (per-device memory and step time, against one device; on a
CPU the devices are simulated and the step times say nothing about parallel speed)::

    bigmodel bench --mesh data:2,fsdp:2,tensor:2 fsdp:8 --preset gpt2-tiny --batch 8 --seq-len 32
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from bigmodel_apps.bench.workloads import DEFAULT_PRESETS, KINDS, SIDES, Workload
from bigmodel_port.atomic import atomic_write_text


def _override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set wants KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        value: Any = json.loads(v)
    except json.JSONDecodeError:
        value = v
    return k.strip(), value


# Choices, spelled out so that building the parser imports neither jax nor torch (``bigmodel
# --help`` stays fast); ``test_benchmarks`` checks them against the modules that define them.
PLAN_NAMES = ("cpu-targets", "gpu", "smoke")
REMAT_CHOICES = ("dots", "dots_no_batch", "full", "none")
ATTENTION_CHOICES = ("einsum", "dot_product_attention")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The suite's flags (shared by ``bigmodel bench`` and ``benchmarks/bench.py``)."""
    p.add_argument("--plan", choices=PLAN_NAMES, help="run a named plan instead of one workload")
    p.add_argument("--out", default="benchmarks/results/local", help="output directory (default %(default)s)")
    p.add_argument("--name", help="file stem of a single run (default: preset-batch-length-dtype)")
    p.add_argument("--mesh", nargs="+", metavar="MESH",
                   help="instead of the suite: the JAX training step on each mesh (e.g. data:2,fsdp:2,tensor:2; "
                        "axes data, fsdp, tensor) and on one device; per-device memory and step time "
                        "(bigmodel_apps.bench.mesh; simulated CPU devices when there are too few)")
    p.add_argument("--mesh-steps", type=int, metavar="N",
                   help="timed steps per mesh with --mesh; the median is reported (default 5)")
    g = p.add_argument_group("workload")
    g.add_argument("--family", choices=sorted(DEFAULT_PRESETS), help="pick the family's default preset")
    g.add_argument("--preset", help="config preset (bert-base, gpt2, llama-3.2-1b, vit-base-16, *-tiny, ...)")
    g.add_argument("--batch", type=int, default=8, help="batch size B (default 8)")
    g.add_argument("--seq-len", type=int, default=128, help="sequence length T (default 128; ignored by ViT)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype; bfloat16 = mixed precision with fp32 master weights")
    g.add_argument("--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set n_layers=2 (repeatable)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    g = p.add_argument_group("what to measure")
    g.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                   help="implementations to measure (default: all)")
    g.add_argument("--kinds", nargs="+", choices=KINDS, default=["train", "forward"],
                   help="decode applies to gpt presets (default: train forward)")
    g.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per measurement")
    g.add_argument("--max-reps", type=int, default=20, help="most timed calls per measurement (default 20)")
    g.add_argument("--decode-new-tokens", type=int, default=32, help="tokens per decode measurement (default 32)")
    g.add_argument("--decode-prompt-len", type=int, default=8, help="prompt tokens before decoding (default 8)")
    g.add_argument("--decode-batch", type=int, default=1, help="sequences decoded together (default 1)")
    g.add_argument("--sweep", type=int, nargs="*", default=[], metavar="B",
                   help="forward throughput at these batch sizes (the PNG plot)")
    g.add_argument("--optimisations", action="store_true",
                   help="measure every PerfOptions switch on / off on the JAX training step")
    g.add_argument("--bf16-parity", action="store_true", help="report bf16 mixed precision's distance to fp32")
    g.add_argument("--onnx", action="store_true",
                   help="also export the model with `bigmodel export --format onnx` and time onnxruntime (CPU) "
                        "beside the JAX forward on the same batch (needs the hf and deploy extras; float32)")
    g.add_argument("--depths", type=int, nargs="*", default=[], metavar="L",
                   help="compile time of the training step at these depths, scan vs unrolled")
    g.add_argument("--no-flop-check", action="store_true", help="skip analytic FLOPs vs XLA cost_analysis")
    g.add_argument("--matmul-n", type=int, default=2048, help="side of the matmul-peak measurement")
    g.add_argument("--bandwidth-mib", type=int, default=512, help="array size of the bandwidth measurement")
    g.add_argument("--torch-compile-timeout", type=float, default=900.0,
                   help="seconds allowed for torch.compile before that side is skipped (default 900)")
    g = p.add_argument_group("JAX options for the headline runs (bigmodel_jax.perf.PerfOptions)")
    g.add_argument("--unrolled", action="store_true", help="Python loop over layers instead of lax.scan")
    g.add_argument("--remat", default="none", choices=REMAT_CHOICES, help="rematerialisation policy (default none)")
    g.add_argument("--attention", default="einsum", choices=ATTENTION_CHOICES,
                   help="attention implementation (default einsum)")
    g.add_argument("--fused-qkv", action="store_true", help="one fused q/k/v projection")
    g.add_argument("--donate", action="store_true", help="donate parameter and optimizer buffers to the step")


def _suite_options(args: argparse.Namespace, command: str) -> Any:
    # these load jax: imported when a run starts, not when the parser is built (see PLAN_NAMES)
    from bigmodel_apps.bench.plans import _variants
    from bigmodel_apps.bench.suite import SuiteOptions
    from bigmodel_jax.perf import PerfOptions

    preset = args.preset or DEFAULT_PRESETS[args.family or "bert"]
    w = Workload(preset, args.batch, args.seq_len, args.dtype, tuple(args.overrides), args.seed)
    perf = PerfOptions(scan_layers=not args.unrolled, remat=args.remat, attention=args.attention,
                       fused_qkv=args.fused_qkv, donate=args.donate,
                       compute_dtype=None if args.dtype == "float32" else args.dtype)
    is_bert = w.config().family == "bert"
    variants = _variants(gpu=False, bf16=args.dtype != "float32", mlm=is_bert) if args.optimisations else ()
    return SuiteOptions(
        w, sides=tuple(args.sides), kinds=tuple(args.kinds), min_time=args.min_time, max_reps=args.max_reps,
        decode_prompt_len=args.decode_prompt_len, decode_new_tokens=args.decode_new_tokens,
        decode_batch=args.decode_batch, sweep_batches=tuple(args.sweep), optimisations=variants,
        bf16_parity=args.bf16_parity, depths=tuple(args.depths), flop_check=not args.no_flop_check, onnx=args.onnx,
        matmul_n=args.matmul_n, bandwidth_bytes=args.bandwidth_mib * 2**20,
        torch_compile_timeout=args.torch_compile_timeout, perf=perf, command=command)


def canonical_command(args: argparse.Namespace) -> str:
    """The equivalent ``bigmodel bench`` command line of parsed ``args`` (every flag whose value
    is set), recorded with the results."""
    from bigmodel_apps.bench.suite import shell_command  # loads jax: see PLAN_NAMES

    parts = ["bigmodel", "bench"]
    for key, value in vars(args).items():
        if key in ("func", "command") or value in (None, False, []):
            continue
        flag = "--" + ("set" if key == "overrides" else key.replace("_", "-"))
        if value is True:
            parts.append(flag)
        elif key == "overrides":
            for k, v in value:
                parts += [flag, f"{k}={v}"]
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shell_command(parts)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run one workload or a plan; write JSON / Markdown / PNG under ``--out``; print the tables.
    The run is recorded with its equivalent ``bigmodel bench`` command (``argv``: the flags after
    ``bench`` as typed; default: rebuilt from ``args``)."""
    # these load jax: imported when a run starts, not when the parser is built (see PLAN_NAMES)
    from bigmodel_apps.bench import plans, report
    from bigmodel_apps.bench.suite import run_in_own_process, run_suite, shell_command

    command = "bigmodel bench " + shell_command(argv) if argv is not None else canonical_command(args)
    out = Path(args.out)
    if args.onnx and (args.plan or args.mesh):
        raise ValueError("--onnx adds onnxruntime to one workload's run; it cannot be combined with "
                         + ("--plan" if args.plan else "--mesh"))
    if args.mesh or args.mesh_steps is not None:
        return _run_mesh(args, command, out)
    if args.plan:
        runs = plans.PLANS[args.plan](command)
    else:
        opts = _suite_options(args, command)
        w = opts.workload
        name = args.name or f"{w.preset}-b{w.batch}-t{w.seq_len}-{w.dtype}"
        runs = [plans.Run(name, opts)]
    results: dict[str, dict[str, Any]] = {}
    files = []
    for r in runs:
        # a plan's runs each get a fresh interpreter: one workload's heap, compiled programs and
        # (on a GPU) device memory cannot slow the next one down
        result = run_in_own_process(r.options) if len(runs) > 1 else run_suite(r.options)
        stem = f"{args.plan}-{r.name}" if args.plan else r.name
        paths = report.write_all(result, out, stem)
        results[r.name] = result
        files.append(paths["md"].name)
        print(report.markdown(result, paths.get("png").name if paths.get("png") else None))
    if args.plan:
        rows = plans.targets(args.plan, results)
        md = plans.targets_markdown(args.plan, rows, files)
        atomic_write_text(out / f"targets-{args.plan}.md", md)
        report.write_json({"plan": args.plan, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": command, "targets": rows}, out / f"targets-{args.plan}.json")
        print(md)
    print(f"results in {out.resolve()}", file=sys.stderr)
    return 0


def _run_mesh(args: argparse.Namespace, command: str, out: Path) -> int:
    """``--mesh``: the mesh benchmark (``bench.mesh``) of the workload the flags describe."""
    from bigmodel_apps.bench import mesh

    if not args.mesh:
        raise ValueError("--mesh-steps needs --mesh")
    if args.plan:
        raise ValueError("--mesh measures one workload; it cannot be combined with --plan")
    opts = _suite_options(args, command)  # the workload and JAX options, as a suite run reads them
    w = opts.workload
    mopts = mesh.MeshOptions(w, tuple(args.mesh), mesh.DEFAULT_STEPS if args.mesh_steps is None else args.mesh_steps,
                             opts.perf, command)
    result = mesh.run_mesh_bench(mopts)
    paths = mesh.write_all(result, out, args.name or f"mesh-{w.preset}-b{w.batch}-t{w.seq_len}-{w.dtype}")
    print(mesh.markdown(result))
    print(f"results in {paths['json'].parent.resolve()}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else argv
    return run(p.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
