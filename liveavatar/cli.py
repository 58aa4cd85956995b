"""The `liveavatar` command line: one `_cmd_<name>(args) -> int` per subcommand, registered in
`build_parser()`; `main` turns a `UserError` into one `error: ...` line on stderr and its exit code.

Subcommands here: `check-ckpt` (verify a checkpoint folder and LoRA from file headers, no weights
read) and `inspect` (tensors, parameters and sizes of a preset's models). The commands only parse
flags, call `liveavatar.checkpoint` and print; they hold no model logic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from liveavatar.config import PRESETS
from liveavatar.errors import UserError


def _cmd_check_ckpt(args: argparse.Namespace) -> int:
    from liveavatar.checkpoint import verify_checkpoint

    report = verify_checkpoint(args.ckpt_dir, lora_path=args.lora_path, only=args.only, preset=args.preset)
    print(report.summary(max_problems=None if args.all_problems else 20))
    return 0 if report.ok else 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    from liveavatar.checkpoint import format_bytes, inspect_preset

    stats = inspect_preset(args.preset)
    if args.json:
        print(json.dumps({"preset": args.preset, "components": [s.to_json() for s in stats]}, indent=2))
        return 0
    import torch

    print(f"preset {args.preset}: tensors, parameters and sizes of the models built on meta")
    print(f"{'component':<24} {'tensors':>8} {'params':>16} {'file dtype':>11} {'file size':>10} "
          f"{'bf16':>10} {'fp32':>10}")
    for s in stats:
        label = s.name if "." not in s.name else "  " + s.name.split(".", 1)[1]
        dtype = str(s.file_dtype).removeprefix("torch.")
        print(f"{label:<24} {s.tensors:>8} {s.params:>16,} {dtype:>11} {format_bytes(s.file_bytes):>10} "
              f"{format_bytes(s.bytes_as(torch.bfloat16)):>10} {format_bytes(s.bytes_as(torch.float32)):>10}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liveavatar", description="Live Avatar: streaming avatar video")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("check-ckpt", help="verify checkpoint files from their headers (no weights read)")
    p.add_argument("--ckpt_dir", required=True, help="the Wan2.2-S2V-14B folder")
    p.add_argument("--lora_path", default=None, help="Live Avatar LoRA (liveavatar.safetensors)")
    p.add_argument("--only", default=None, help="comma list of dit,lora,t5,vae,audio,tokenizer (default all)")
    p.add_argument("--preset", default="s2v-14b", choices=sorted(PRESETS))
    p.add_argument("--all_problems", action="store_true", help="list every problem (default: 20 a component)")
    p.set_defaults(func=_cmd_check_ckpt)

    p = sub.add_parser("inspect", help="tensors, parameters and bytes of a preset's models")
    p.add_argument("--preset", default="s2v-14b", choices=sorted(PRESETS))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # stdout piped into a reader that stopped early (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
