"""Settings read from the environment in one place (never os.getenv in hot code); the default
Session holds the current ones."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

DB_ENV = "AUTOCONV_DB"
SHIPPED_DB_ENV = "AUTOCONV_SHIPPED_DB_DIR"
DB_FILENAME = "tuning.db"


@dataclass(frozen=True)
class Settings:
    """Where tuning results are read from and written to."""

    db_path: Path  # the user's tuning DB: $AUTOCONV_DB, else <user cache dir>/autoconv/tuning.db
    shipped_db_dir: Path | None  # databases that ship with autoconv ($AUTOCONV_SHIPPED_DB_DIR overrides; "" disables)

    @property
    def shipped_dbs(self) -> tuple[Path, ...]:
        if self.shipped_db_dir is None or not self.shipped_db_dir.is_dir():
            return ()
        return tuple(sorted(self.shipped_db_dir.glob("*.db")))


def current_umask() -> int:
    """The process's umask (read by setting it and back): the mode files the user gets follow it."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_shipped_dir() -> Path:
    """tuning_db/ inside an installed wheel, else the repository's top-level tuning_db/."""
    packaged = Path(__file__).resolve().parent / "tuning_db"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "tuning_db"


def read_settings() -> Settings:
    """The settings as the environment says now."""
    raw_db = os.environ.get(DB_ENV, "").strip()
    db_path = Path(raw_db).expanduser() if raw_db else Path(platformdirs.user_cache_dir("autoconv")) / DB_FILENAME
    raw_shipped = os.environ.get(SHIPPED_DB_ENV)
    if raw_shipped is None:
        shipped: Path | None = _default_shipped_dir()
    else:
        shipped = Path(raw_shipped).expanduser() if raw_shipped.strip() else None
    return Settings(db_path=db_path, shipped_db_dir=shipped)


def settings() -> Settings:
    """The default session's settings (read from the environment once, when it was made)."""
    from autoconv.serve.session import default_session

    return default_session().settings


def reload_settings() -> Settings:
    """Read the environment again into the default session (tests, or a long-lived process whose
    environment changed); its cached answers are dropped."""
    from autoconv.serve.session import default_session

    default_session().configure(read_settings())
    return default_session().settings
