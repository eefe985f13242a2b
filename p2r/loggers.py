"""``CSVLogger`` whose folder may be left to the run: the shipped configs' metrics logger.

Lightning's CSVLogger requires ``save_dir``, so a config had to spell out a folder that
``--trainer.default_root_dir`` did not move. This one takes ``save_dir: null``, which the p2r CLI
fills with ``trainer.default_root_dir`` before anything is built (``p2r.cli.follow_root_dir``):
metrics then land in ``<default_root_dir>/logs/version_N/metrics.csv`` wherever the run goes.
"""

from __future__ import annotations

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, with ``save_dir`` optional (null: the trainer's ``default_root_dir``)."""

    def __init__(self, save_dir: str | None = None, name: str = "logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        """
        Args:
            save_dir: Folder of the logs (null: trainer.default_root_dir, filled in by the p2r CLI).
            name: Subfolder of save_dir.
            version: Version subfolder (None: the next free version_N).
            prefix: Prefix of every metric key.
            flush_logs_every_n_steps: How often metrics.csv is written.
        """
        if save_dir is None:
            raise ValueError("CSVLogger(save_dir=None): the p2r CLI fills in trainer.default_root_dir; "
                             "give a folder when you build the logger yourself")
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)
