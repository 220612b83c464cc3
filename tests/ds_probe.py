"""Started on every rank by tests/test_deepspeed.py through the real deepspeed launcher.

    python -m deepspeed.launcher.runner --num_accelerators N --no_local_rank tests/ds_probe.py CONFIG OUT [overrides]

Runs stage 2 (`run_finetune`) and then the trained model's logits on a fixed input: under ZeRO-3
that forward is itself a collective (every rank gathers each layer). Rank 0 writes OUT/probe.json
(losses, run info with the per-rank partition report) and OUT/logits.safetensors.
PROBE_STOP_AT_STEP=k makes every rank see a stop request at step k, as after a SIGTERM.
PROBE_NAN_AT=CALL:RANK makes the loss of that rank's CALL-th forward (counting from 1) NaN.
"""

import json
import os
import sys
from pathlib import Path


def main() -> int:
    cfg_path, out = sys.argv[1], Path(sys.argv[2])
    import torch

    from dist_secvec import runtime
    from dist_secvec.config import load_config, validate
    from dist_secvec.finetune import run_finetune
    from dist_secvec.errors import Stopped
    from dist_secvec.interrupt import StopRequest

    runtime.setup_logging("warning")
    cfg = validate(load_config(cfg_path, sys.argv[3:]), "finetune")
    stop_at = os.environ.get("PROBE_STOP_AT_STEP")
    if stop_at:
        StopRequest.requested = lambda self, step: (setattr(self, "signal_name", "SIGTERM (probe)")
                                                    or step >= int(stop_at))
    nan_at = os.environ.get("PROBE_NAN_AT")
    if nan_at:
        from dist_secvec.distributed import DeepSpeedEngine

        call, on_rank = map(int, nan_at.split(":"))
        forward, count = DeepSpeedEngine.__call__, [0]

        def nan_forward(self, **batch):
            out = forward(self, **batch)
            count[0] += 1
            if count[0] == call and runtime.rank() == on_rank:
                out["loss"] = out["loss"] * float("nan")
            return out
        DeepSpeedEngine.__call__ = nan_forward
    try:
        res = run_finetune(cfg, keep_model=True)
    except Stopped as e:
        if runtime.is_main():
            out.mkdir(parents=True, exist_ok=True)
            (out / "probe.json").write_text(json.dumps({"stopped": str(e)}))
        return 0
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37]])
    # train mode (no dropout in these configs): in eval mode bitsandbytes' CPU path repacks a 4-bit
    # weight in place on first use (Linear4bit.forward), which breaks a ZeRO-3 partitioned weight
    res.model.train()
    with torch.no_grad():
        logits = res.model(input_ids=ids).logits.float()
    if runtime.is_main():
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({"logits": logits.contiguous()}, str(out / "logits.safetensors"))
        import deepspeed.comm.comm as ds_comm

        shm = getattr(ds_comm.cdb, "shm_comm_op", None) is not None  # DeepSpeed's CPU shm all-reduce in use
        (out / "probe.json").write_text(json.dumps({"losses": res.losses, "info": res.info, "shm_comm_op": shm,
                                                    "master_port": os.environ.get("MASTER_PORT")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
