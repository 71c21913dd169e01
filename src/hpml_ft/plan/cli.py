"""`python -m hpml_ft.plan RECIPE [overrides] --gpus N --gpu-mem-gib G [--zero 0-3] [--offload]`: memory plan."""

from __future__ import annotations

from hpml_ft.config import load_config
from hpml_ft.config.runtime import PLAN_GPU_MEM_GIB
from hpml_ft.errors import ArgumentParser, fail, finite_float
from hpml_ft.plan.recipe import accelerate_processes, setup_for, shape_for
from hpml_ft.plan.render import ram_gib, render
from hpml_ft.runs import base_model_path


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m hpml_ft.plan", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/fft_llama3_8b_tatqa.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.per_device_batch_size=2")
    p.add_argument(
        "--gpus", type=int, help="data-parallel GPUs (default: the recipe's accelerate_config; --cpu: 1)"
    )
    p.add_argument(
        "--gpu-mem-gib",
        type=finite_float,
        help=f"memory per GPU in GiB (default {PLAN_GPU_MEM_GIB:g}; --cpu: this machine's RAM)",
    )
    p.add_argument(
        "--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage, 0 = no DeepSpeed (default: recipe's)"
    )
    p.add_argument(
        "--offload", action="store_true", default=None, help="offload optimizer (ZeRO-3: and weights)"
    )
    p.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32) instead of GPUs")
    args = p.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        fail(f"--gpus must be at least 1, got {args.gpus}")
    if args.gpu_mem_gib is not None and args.gpu_mem_gib <= 0:
        fail(f"--gpu-mem-gib must be positive, got {args.gpu_mem_gib:g}")
    cfg = load_config(args.recipe, args.overrides)
    gpus = args.gpus or (1 if args.cpu else accelerate_processes(cfg))
    st = setup_for(cfg, gpus, gpu=not args.cpu, zero=args.zero, offload=args.offload)
    sh, source = shape_for(cfg, base_model_path(cfg.model.name_or_path))
    print(f"model: {cfg.model.name_or_path} (config: {source})")
    print(
        render(
            sh,
            st,
            args.gpu_mem_gib or (ram_gib() if args.cpu else PLAN_GPU_MEM_GIB),
            "CPU" if args.cpu else "GPU",
        )
    )
    return 0
