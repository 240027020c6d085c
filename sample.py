"""Sample a trained model with any guidance method, from the Hydra configs in configs/.

    python sample.py checkpoint=runs/quickstart/checkpoints/last.ckpt guidance=cfg per_class=50
    python sample.py checkpoint=... guidance=erg guidance.image.layers=[2,4]      # ERG on a 6-block model
    python sample.py model=sit_xl2 model.checkpoint=/path/SiT-XL-2-256x256.pt autoencoder=...  # SiT-XL/2
    python sample.py checkpoint=... mode=grid grid.methods=[none,cfg,"erg image.layers=[2,4]"]
    torchrun --nproc_per_node=8 sample.py ...                                     # ranks split the shards

Everything is assembled in models/generation.py; this file only parses the config and reports.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

log = logging.getLogger("erg.sample")


WRITES = "out_dir=<folder>"  # where sample.py writes (named in errors)


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from models.cli import reported
    from models.generation import run

    with reported(cfg, writes=WRITES):
        summary = run(cfg)
    log.info("done: %s", summary)
    if "grid" in summary:
        print(f"\nGrid of {summary['methods']} written to {summary['grid']}")
    else:
        rate = summary["images_per_second"]
        print(
            f"\nSampled {summary['sampled']} images ({rate:.2f} img/s) on rank {summary['rank']} of "
            f"{summary['world_size']}; {summary['skipped_shards']} finished shards skipped.\n"
            f"  samples: {summary['out_dir']} ({'complete' if summary['complete'] else 'other ranks still running'})"
            if rate
            else f"\nNothing left to sample in {summary['out_dir']} (rank {summary['rank']}); all shards were done."
        )
    return summary


if __name__ == "__main__":
    from models.cli import run_hydra

    run_hydra(main, writes=WRITES)
