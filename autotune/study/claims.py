"""Config claims: which trial measures a deployment, decided by the study's own database.

Two workers (or two parallel trials) that sample the same deployment at the same moment would both find
no earlier trial and both launch it. A row per (study, config key) with a primary key settles it: the
INSERT is atomic in every SQL database Optuna stores studies in (SQLite, PostgreSQL, MySQL), so exactly
one trial wins; the others reuse its result. A measurement that was interrupted hands the claim over
with a compare-and-set UPDATE, so a re-queued configuration is measured again exactly once.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

_METADATA = sa.MetaData()
CLAIMS = sa.Table(
    "autotune_config_claims",
    _METADATA,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("config_key", sa.String(64), primary_key=True),
    sa.Column("trial_number", sa.Integer, nullable=False),
)
"""Lives beside Optuna's tables; Optuna ignores tables it does not own."""


class ConfigClaims:
    """Claims of one study in the database at `storage_url` (any SQLAlchemy URL Optuna accepts)."""

    def __init__(self, storage_url: str, study_name: str) -> None:
        connect_args = {"timeout": 60} if storage_url.startswith("sqlite") else {}
        self.engine = sa.create_engine(storage_url, connect_args=connect_args)
        self.study_name = study_name
        self._create_table()

    def _create_table(self) -> None:
        try:
            _METADATA.create_all(self.engine, checkfirst=True)
        except (IntegrityError, OperationalError, ProgrammingError):
            # another worker created it between the check and the CREATE: fine if it exists now
            if not sa.inspect(self.engine).has_table(CLAIMS.name):
                raise

    def claim(self, config_key: str, trial_number: int) -> int | None:
        """Claim the config for this trial: None when it is ours now, else the holder's trial number."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    CLAIMS.insert().values(
                        study_name=self.study_name, config_key=config_key, trial_number=trial_number
                    )
                )
            return None
        except IntegrityError:
            holder = self.holder(config_key)
            if holder is None:  # released between our INSERT and SELECT: try once more
                return self.claim(config_key, trial_number)
            return None if holder == trial_number else holder

    def hand_over(self, config_key: str, holder: int, trial_number: int) -> bool:
        """Take the claim from `holder` (whose measurement was interrupted); False when another won."""
        with self.engine.begin() as conn:
            result = conn.execute(
                CLAIMS.update()
                .where(
                    CLAIMS.c.study_name == self.study_name,
                    CLAIMS.c.config_key == config_key,
                    CLAIMS.c.trial_number == holder,
                )
                .values(trial_number=trial_number)
            )
        return result.rowcount == 1

    def holder(self, config_key: str) -> int | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(CLAIMS.c.trial_number).where(
                    CLAIMS.c.study_name == self.study_name, CLAIMS.c.config_key == config_key
                )
            ).first()
        return None if row is None else int(row[0])

    def close(self) -> None:
        self.engine.dispose()
