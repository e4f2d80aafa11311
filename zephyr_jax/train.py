"""Train a Mixtral with ORPO: `python -m zephyr_jax.train CONFIG.yaml [--key value ...]`.

Example (the demo: a tiny Mixtral on the shipped sample data, a few minutes on a laptop CPU):

    python -m zephyr_jax.train configs/demo.yaml --output_dir outputs/demo

Keys are the alignment-handbook's (learning_rate, num_train_epochs, beta, max_length, ...);
command-line values override the file. A run on an output_dir with checkpoints resumes.
"""

from __future__ import annotations

import sys

from zephyr_jax.train_config import DEMO_CONFIG, load_train_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    path = argv.pop(0) if argv and not argv[0].startswith("--") else DEMO_CONFIG
    from zephyr_jax.trainer import main_guard, train

    def run():
        cfg = load_train_config(path, argv)
        summary = train(cfg)
        print("[train] done: " + ", ".join(
            f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float | int)), flush=True)

    return main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
