"""The `dist-secvec` command line (also `python -m dist_secvec`).

    dist-secvec demo      [output_dir=DIR] [--quick]          the embedded world, end to end
    dist-secvec train-sv  --config FILE [key.sub=value ...]   stage 1: train the security vector
    dist-secvec finetune  --config FILE [key.sub=value ...]   stage 2: fine-tune with the vector on
    dist-secvec eval      --config FILE [key.sub=value ...]   generate (vector off) and judge
    dist-secvec export    --config FILE [key.sub=value ...]   write the model without the vector
    dist-secvec audit     --config FILE [key.sub=value ...]   flag the rows the vector explains
    dist-secvec recipes   [copy NAME [DEST]]                  list the shipped recipes, or copy one out

Config errors end in one line and exit code 2 before anything heavy is imported. The deepspeed
launcher's --local_rank=N is accepted (the rank itself comes from the environment).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dist_secvec.errors import Stopped, UserError

COMMANDS = {
    "demo": "run the embedded tiny world end to end: aligned base, stage 1, stage 2 with and without the vector",
    "train-sv": "stage 1: train a security vector on harmful data (base frozen, KL on benign data)",
    "finetune": "stage 2: fine-tune with the security vector active and frozen (or plain SFT without one)",
    "eval": "generate with the vector off and judge harmfulness and utility (or judge given responses)",
    "export": "write the fine-tuned model or adapter for inference, with no trace of the vector",
    "audit": "score every row of data.train with the vector off and on and flag those it explains "
             "(audit.jsonl, summary, histogram)",
    "profile": "time, tokens/s, FLOPs/MFU and memory of the stage-2 job, and the vector's overhead "
               "(no --config: the demo's job)",
    "experiment": "run or resume a sweep (harmful samples x vector off/on x vector size x seeds) from "
                  "configs/experiments/*.yaml; results.csv/.md/.png",
}

RECIPES_HELP = ("list the recipes shipped with the package (configs/), or copy one with the DeepSpeed JSONs it "
                "names into a directory")

# under a launcher with several ranks these run on rank 0 alone (the others exit 0 at once):
# stage 1 trains on ~100 samples (every rank trains under deepspeed.zero_stage / deepspeed.config),
# and eval and export read a finished, whole model
ONE_RANK_COMMANDS = ("train-sv", "eval", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-secvec", description=__doc__.split("\n\n")[0])
    # the deepspeed launcher puts --local_rank=N before the command (`-m dist_secvec --local_rank=0 finetune`)
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        if name == "demo":
            p.add_argument("--quick", action="store_true", help="small world and few steps (tests, smoke runs)")
        if name == "profile":
            p.add_argument("--steps", type=int, default=None, help="measured steps (profile.steps)")
            p.add_argument("--warmup", type=int, default=None, help="unmeasured warmup steps (profile.warmup)")
    # no config of its own: positional words, not overrides
    p = sub.add_parser("recipes", help=RECIPES_HELP, description=RECIPES_HELP)
    p.add_argument("words", nargs="*", metavar="copy NAME [DEST]",
                   help="copy recipe NAME (and the DeepSpeed JSONs it names) into DEST (default: the cwd)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(overrides=[], config=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may sit on both sides of a flag (`profile output_dir=X --steps 3 optim.lr=1e-4`)
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or args.command == "recipes"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(args.overrides) + extra
    local_rank = args.local_rank if args.local_rank is not None else args.launcher_local_rank
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    # under a launcher every rank may report: say which one speaks
    who = f"dist-secvec {args.command}" + (f" [rank {os.environ.get('RANK', '?')}]"
                                           if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
    try:
        return _run(args)
    except Stopped as e:  # SIGTERM/SIGINT in training: checkpoint written, not an error
        print(f"{who}: {e}", file=sys.stderr)
        return 0
    except UserError as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"{who}: error: {one_line(str(e))}", file=sys.stderr)
        return _failed(e.exit_code)
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so in one line unless asked for the traceback
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"{who}: internal error: {type(e).__name__}: {first} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return _failed(1)


def _failed(code: int) -> int:
    """The exit code of a failed command; in a multi-rank job the process leaves at once with it.
    After a peer died or hung, the process group still has operations pending on the broken
    connection, and tearing the interpreter down then can abort in gloo's threads ("terminate
    called without an active exception", exit -6 instead of the error's code: seen in a test).
    Everything this process wrote is already complete (atomic writes), so nothing is lost."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def one_line(text: str) -> str:
    """A message on one line: embedded newlines (from library errors) become spaces."""
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def preflight(cfg, command: str) -> None:
    """Checks of the input files that need no model loaded, so a bad model directory or security
    vector is reported in seconds rather than after the data and the model are loaded:
    the model directory (config.json, safetensors weights, whole files, no pickle), and for
    stage 2 the vector's files (hashes, consistency) and its base fingerprint from the model's
    config.json and safetensors headers, and the checkpoint checkpoint.resume names. The stages
    repeat the full checks on what they load."""
    from dist_secvec.config import looks_local

    needs_model = command in ("train-sv", "finetune", "audit") or (command == "eval" and cfg.eval.responses is None)
    if needs_model and cfg.model.path and looks_local(cfg.model.path):
        from dist_secvec.model import check_model_dir

        check_model_dir(cfg.model.path)
        if cfg.model.tokenizer and looks_local(cfg.model.tokenizer):
            check_model_dir(cfg.model.tokenizer, key="model.tokenizer", need_weights=False)
    if command in ("finetune", "audit") and cfg.security_vector.path:
        from dist_secvec.stage2 import check_vector_config
        from dist_secvec.secvec import check_fingerprint_on_disk, load_security_vector

        sv = load_security_vector(cfg.security_vector.path)
        check_vector_config(cfg, sv)  # security_vector.rank / target_modules, when set, match the vector
        if cfg.model.path:
            check_fingerprint_on_disk(sv, cfg.model.path)
        if command == "audit" or cfg.data.audit != "off":
            from dist_secvec.audit import resolve_thresholds

            resolve_thresholds(cfg, sv)  # a vector that can place no threshold, refused before the model loads
    if command == "finetune":
        from dist_secvec.checkpoint import check_resume

        check_resume(cfg.checkpoint.resume, cfg.output_dir)


def _sv_on_every_rank(cfg, args) -> bool:
    """train-sv with DeepSpeed asked for: every rank trains its share (dist_secvec.train_sv)."""
    if args.command != "train-sv":
        return False
    from dist_secvec.distributed import uses_deepspeed

    return uses_deepspeed(cfg, several_ranks=False)


def _run(args) -> int:
    from dist_secvec.config import load_config, refuse_finished_run, refuse_ignored_keys, validate
    from dist_secvec.runtime import library_progress

    library_progress(True)  # off a terminal none, for every command (profile and experiment return below)
    if not args.debug:
        import warnings

        # peft asks transformers' deprecated is_gradient_checkpointing on every LoRA wrap (stage 1,
        # QLoRA): a library's note to itself, not something the user can act on
        warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if args.command == "recipes":
        from dist_secvec.recipes import main as recipes_main

        return recipes_main(args.words[0] if args.words else None, args.words[1:])
    if args.command == "demo":
        from dist_secvec.worlds.embedded_stages import demo_defaults

        overrides = list(args.overrides) + (["demo.quick=true"] if args.quick else [])
        cfg = validate(load_config(args.config, overrides, base=demo_defaults()), "demo")
    elif args.command == "profile":
        from dist_secvec.profile import cli_main as profile_main

        base = prepare = None
        if args.config is None:  # the embedded demo's stage-2 job
            from dist_secvec.demo.profile_job import profile_defaults, profile_job

            base, prepare = profile_defaults(), profile_job
        return profile_main(args.config, list(args.overrides), args.steps, args.warmup, debug=args.debug,
                            base=base, prepare=prepare)
    elif args.command == "experiment":  # its own file format (dist_secvec.experiment)
        from dist_secvec.experiment import main as experiment_main

        return experiment_main(args.config, list(args.overrides), debug=args.debug)
    else:
        cfg = validate(load_config(args.config, args.overrides), args.command)
        refuse_finished_run(cfg, args.command)
        refuse_ignored_keys(cfg, args.command)

    from dist_secvec.runtime import rank, setup_logging, world_size

    setup_logging("debug" if args.debug else cfg.logging.level)
    library_progress(cfg.logging.progress)
    log = logging.getLogger("dist_secvec")
    if args.command in ONE_RANK_COMMANDS and world_size() > 1 and rank() != 0 and not _sv_on_every_rank(cfg, args):
        log.warning("%s runs on rank 0 only; rank %d has nothing to do", args.command, rank())
        return 0
    if cfg.model.gguf_file and args.command != "demo":
        from dist_secvec.model import resolve_gguf

        resolve_gguf(cfg.model)  # once, before the checks: every later step loads the converted directory
    if args.command == "finetune":
        from dist_secvec.interrupt import StopRequest

        with StopRequest():  # SIGTERM/SIGINT while checking the inputs: stop at once, exit 0
            preflight(cfg, args.command)
    elif args.command != "demo":
        preflight(cfg, args.command)
    if args.command == "demo":
        from dist_secvec.demo.run import run_demo

        run_demo(cfg)
    elif args.command == "train-sv":
        from dist_secvec.train_sv import run_train_sv

        res = run_train_sv(cfg, use_deepspeed=True)
        log.info("vector written to %s", res.vector_dir)
    elif args.command == "finetune":
        from dist_secvec.finetune import run_finetune

        res = run_finetune(cfg)
        log.info("fine-tuned %s written to %s", "model" if cfg.adapter.type == "none" else "adapter", res.final_dir)
    elif args.command == "eval":
        from dist_secvec.evaluate import run_eval

        run_eval(cfg)
    elif args.command == "export":
        from dist_secvec.export import run_export

        run_export(cfg)
    elif args.command == "audit":
        from dist_secvec.audit import run_audit

        run_audit(cfg)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
