"""The p2r command line: LightningCLI over p2r's modules and the WebDataset DataModule.

    python -m p2r fit  --config configs/sft.yaml [--config configs/tiny.yaml] [--print_config]
    python -m p2r fit  --config configs/pagrpo.yaml --print_memory [--device_memory_gb 80]
    python -m p2r test --config configs/eval.yaml --ckpt_path CKPT
    python -m p2r predict --config configs/predict.yaml --ckpt_path CKPT --data.predict_file questions.jsonl
    p2r --help

``main(args)`` runs the same thing in-process (tests call ``main(["fit", "--config", ...])``).
The model is chosen by ``model.class_path`` (``p2r.algorithms.sft.SFTModule``, ...), the backbone
inside it by ``model.init_args.backbone.class_path``; every typed ``__init__`` argument becomes a
documented option in ``--help``.

Flags are matched exactly (argparse would otherwise take ``--trainer.max_step`` for
``--trainer.max_steps`` without a word). Outputs the config leaves unplaced follow
``trainer.default_root_dir`` (:func:`follow_root_dir`). Before ``fit`` builds anything, the folders
checkpoints and logs go to must be writable, and a ``last.ckpt`` already there must be the one this
run resumes. Every run writes single-file checkpoints atomically
(:class:`p2r.checkpoints.AtomicCheckpointIO`). When stderr is not a terminal (SLURM, ``nohup``)
and no progress bar is configured, progress is printed as plain lines (:mod:`p2r.progress`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from p2r.algorithms.base import VideoLVLMModule
from p2r.algorithms.settings import SettingError
from p2r.checkpoints import check_last_destination, check_writable, install_atomic_checkpoint_io
from p2r.compat import CheckpointSuppliesWeightsOnly, configure_cli_process
from p2r.data.datamodule import VideoDataModule
from p2r.progress import LineProgressBar, wants_line_progress


class P2RCLI(CheckpointSuppliesWeightsOnly, LightningCLI):
    """LightningCLI where the config files and flags alone define the run.

    Lightning's CLI merges the hyperparameters saved in a ``--ckpt_path`` checkpoint over the
    config, and the checkpoint's module class over the configured one: ``p2r test --config
    configs/eval.yaml --ckpt_path <an RL checkpoint>`` would then silently evaluate with the
    training run's decoding settings, and ``--model.init_args.eval_temperature=...`` would be
    ignored. In p2r a checkpoint supplies weights and training state only (``p2r.compat``).
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Used for the main parser and every subcommand's: no flag is ever matched by its prefix.
        return super().init_parser(**{**kwargs, "allow_abbrev": False})

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init.get(self.subcommand) if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        if "callbacks" not in kwargs and wants_line_progress(trainer_config):
            callbacks = trainer_config.get("callbacks") or []
            kwargs["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), LineProgressBar()]
        trainer = super().instantiate_trainer(**kwargs)
        install_atomic_checkpoint_io(trainer)
        return trainer

    def before_fit(self) -> None:
        """Refuse output folders that cannot be written, and a ``last.ckpt`` there that this run
        would write beside or could not replace (:func:`p2r.checkpoints.check_last_destination`),
        before the model is built."""
        trainer = self.trainer
        folders = {"trainer.default_root_dir": trainer.default_root_dir}
        for logger in trainer.loggers:
            if getattr(logger, "save_dir", None):
                folders[f"{type(logger).__name__}.save_dir"] = logger.save_dir
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                folders["ModelCheckpoint.dirpath"] = callback.dirpath
        check_writable(folders)
        check_last_destination(trainer, self.config[self.subcommand].get("ckpt_path"))

    def instantiate_classes(self) -> None:
        """As LightningCLI, but a setting refused by its range check (p2r.algorithms.settings) is
        raised as itself, not buried under jsonargparse's "does not validate against any of the
        Union subtypes" with the whole config namespace printed."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, SettingError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--print_memory", action="store_true",
            help="Print the per-GPU memory plan of this fit run (p2r.memory_plan) and exit without building the model.",
        )
        parser.add_argument("--device_memory_gb", type=float, default=80.0, help="GPU memory (GiB) the plan is checked against.")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        follow_root_dir(config)
        if not config.get("print_memory"):
            return
        if self.subcommand != "fit":
            raise SystemExit(f"--print_memory plans a fit run, not {self.subcommand!r}")
        from p2r.memory_plan import format_plan, plan_from_config

        print(format_plan(plan_from_config(config.as_dict()), config.device_memory_gb))
        raise SystemExit(0)


def _entries(value: Any) -> list[Any]:
    """A config value that may be one class entry, a list of them, a bool or None, as a list of entries."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if hasattr(v, "get") and v.get("class_path")]


def follow_root_dir(config: Any) -> None:
    """Place every output the config leaves unplaced under ``trainer.default_root_dir``: a logger's
    ``save_dir`` left null goes there, a ModelCheckpoint's ``dirpath`` left null goes to
    ``<default_root_dir>/checkpoints``. The shipped configs leave both null, so
    ``--trainer.default_root_dir=runs/try2`` moves a whole run (checkpoints, logs, rollout tables,
    predictions) and never writes over another run's checkpoints; a folder set explicitly stays.
    (Lightning's own ModelCheckpoint default would be the first logger's version folder, which
    ``--ckpt_path last`` of a new run does not look in.)"""
    trainer = config.get("trainer")
    root = trainer.get("default_root_dir") if trainer is not None else None
    if not root:
        return
    for logger in _entries(trainer.get("logger")):
        args = logger.get("init_args")
        if args is not None and "save_dir" in args and args.get("save_dir") is None:
            args["save_dir"] = str(root)
    for callback in _entries(trainer.get("callbacks")):
        args = callback.get("init_args")
        if str(callback.get("class_path")).endswith("ModelCheckpoint") and args is not None and args.get("dirpath") is None:
            args["dirpath"] = str(Path(root) / "checkpoints")


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI; ``args`` defaults to sys.argv. Returns the CLI object (trainer, model, ...).
    With ``run=False`` the arguments name no subcommand: it builds the trainer, model and data and stops."""
    # Warning filters, TOKENIZERS_PARALLELISM, field docstrings in --help, nested null values: p2r.compat.
    configure_cli_process()
    return P2RCLI(
        model_class=VideoLVLMModule,
        subclass_mode_model=True,
        datamodule_class=VideoDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        run=run,
    )
