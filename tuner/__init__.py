"""The tuner: space files, Optuna studies, trial launching, regression checks.

Knows Optuna; never imports torch (runners run in child processes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuner.errors import UsageError
from tuner.space import Space, SpaceError, load_space

if TYPE_CHECKING:
    import optuna


def load_study(storage: str | optuna.storages.BaseStorage = "runs/optuna.journal",
               study_name: str | None = None) -> optuna.Study:
    """A study from a journal path, a storage URL or a storage object, in one line.

    `load_study("runs/optuna.journal", "batch_quant")`; the name may be left out when the
    storage holds one study. A plain path is a journal file (what `autoglm-tune` writes).
    """
    import optuna

    from tuner.storage import open_existing_storage

    opened = open_existing_storage(storage) if isinstance(storage, str) else storage
    if study_name is None:
        names = optuna.get_all_study_names(opened)
        if len(names) != 1:
            raise UsageError(f"{storage}: holds {len(names)} studies ({', '.join(names) or 'none'}); "
                             f"name one: load_study(storage, study_name)")
        study_name = names[0]
    elif study_name not in (names := optuna.get_all_study_names(opened)):
        raise UsageError(f"no study {study_name!r} in {storage} (studies: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study_name, storage=opened)


__all__ = ["Space", "SpaceError", "UsageError", "load_space", "load_study"]
