"""The ``rose`` command. One subcommand per stage; each fills the stage's dataclass config from
``--config FILE`` and/or flags and calls the same Python function a user would call.

Stage modules are imported only when their subcommand runs, so ``rose --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rose_select import __version__
from rose_select.config import add_arguments, from_args
from rose_select.data import validate_file
from rose_select.errors import RoseError, describe_os_error
from rose_select.distributed import leave_open_group
from rose_select.modeling import load_adapter, load_model, load_tokenizer
from rose_select.records import Message
from rose_select.runtime import configure_cpu, quiet_libraries
from rose_select.tokenization import TokenizeConfig, encode_prompt

# command -> "module:ConfigClass:run_function" (imported only when the command runs)
STAGES = {
    "warmup": "rose_select.train.stage:WarmupConfig:run_warmup",
    "featurize": "rose_select.features.stage:FeaturizeConfig:run_featurize",
    "select": "rose_select.select.stage:SelectConfig:run_select",
    "train": "rose_select.train.stage:TrainConfig:run_train",
    "evaluate": "rose_select.evaluation:EvalConfig:run_evaluate",
    "run": "rose_select.pipeline:RunConfig:run_pipeline",
    "experiment": "rose_select.experiments:ExperimentConfig:run_experiment",
}
HELP = {
    "warmup": "LoRA warm-up on a random fraction of the pool, one checkpoint (adapter + Adam moments) per epoch",
    "featurize": "per-example gradient features (SFT/Adam for the pool, pairwise for validation), projected",
    "select": "score the pool with a method (rose, less, random, bm25, rds, dsir, influence, shapley, full) and select",
    "train": "final LoRA fine-tune on a selection (or random / full)",
    "evaluate": "held-out preference accuracy, reward margins, validation losses, golden-answer log-likelihood",
    "run": "the whole pipeline from a config file, resumable stage by stage",
    "experiment": "the paper's tables and figures, and the selection-quality benchmark",
}
OTHER = {"data": "inspect and validate data files (rose data validate FILE)",
         "answer": "greedy-answer a prompt with a model (and optional adapter)"}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rose", description="Reward-oriented data selection (ROSE) and its baselines.")
    p.add_argument("--version", action="version", version=f"rose-select {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGES:
        sub.add_parser(name, help=HELP[name], add_help=False)
    for name, help_text in OTHER.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def _stage_main(name: str, argv: list[str]) -> int:

    module_name, cfg_name, fn_name = STAGES[name].split(":")
    module = importlib.import_module(module_name)
    cfg_cls, fn = getattr(module, cfg_name), getattr(module, fn_name)
    p = argparse.ArgumentParser(prog=f"rose {name}", description=HELP[name])
    p.add_argument("--config", help="YAML file with the config; flags override its values")
    if hasattr(module, "add_cli_arguments"):
        module.add_cli_arguments(name, p)
    add_arguments(p, cfg_cls)
    args = p.parse_args(argv)
    if hasattr(module, "handle_cli"):
        handled = module.handle_cli(name, args)
        if handled is not None:
            return handled
    cfg = from_args(cfg_cls, args, args.config)
    finished = False
    try:
        result = fn(cfg)
        finished = True
    finally:
        leave_open_group(finished)
    if result is not None and os.environ.get("RANK", "0") == "0":  # under torchrun: once, not per rank
        print(result)
    return 0


def _data_main(argv: list[str]) -> int:

    p = argparse.ArgumentParser(prog="rose data", description=OTHER["data"])
    sub = p.add_subparsers(dest="action", required=True)
    v = sub.add_parser("validate", help="report every problem of a pool or preference file, with counts")
    v.add_argument("files", nargs="+")
    v.add_argument("--kind", default="auto", choices=["auto", "pool", "preference"])
    v.add_argument("--format", default="auto")
    v.add_argument("--num-subtasks", type=int, default=None)
    args = p.parse_args(argv)
    status = 0
    for f in args.files:
        kwargs = {"format": args.format}
        if args.num_subtasks:
            kwargs["num_subtasks"] = args.num_subtasks
        report = validate_file(f, kind=args.kind, **kwargs)
        print(report.format())
        status |= 0 if report.ok else 1
    return status


def _answer_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rose answer", description=OTHER["answer"])
    p.add_argument("prompt")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    import torch

    model, tok = load_model(args.model), load_tokenizer(args.model)
    if args.adapter:
        model = load_adapter(model, args.adapter, trainable=False)
    ids = encode_prompt([Message("user", args.prompt)], tok, TokenizeConfig())
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0][len(ids):], skip_special_tokens=True).strip())
    return 0


def main(argv: list[str] | None = None) -> int:

    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        top.parse_args(argv or ["--help"])
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in STAGES or command == "answer":
            quiet_libraries()  # before transformers loads: it reads its verbosity then
            configure_cpu()  # before torch loads: OpenMP reads its wait policy then
        if command in STAGES:
            return _stage_main(command, rest)
        if command == "data":
            return _data_main(rest)
        if command == "answer":
            return _answer_main(rest)
    except RoseError as e:
        print(f"rose {command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only directory, a file where a directory should be
        print(f"rose {command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    top.parse_args(argv)  # unknown command: argparse prints the choices and exits 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
