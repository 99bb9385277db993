"""Deleting a user and everything of theirs: API keys (revoked first, through the one revocation path),
browser sessions, login links, datasets, jobs and models, and their files.

Refused while a job of theirs (or one trained on their datasets) is queued or running: its process would
keep writing into rows and folders being removed. Cancel those jobs first.
"""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.db.tables import ApiKey, Dataset, Job, Model, User
from app.services import auth

ACTIVE_JOB_STATUSES = ("queued", "running")


def delete_user(session: Session, user: User) -> list[str]:
    """Delete ``user``'s rows (the caller commits); returns the storage keys of their files, to remove
    once the deletion is committed (files of a row that still exists are never removed)."""
    datasets = select(Dataset.id).where(Dataset.owner_id == user.id)
    active = session.scalars(
        select(Job.id)
        .where(Job.status.in_(ACTIVE_JOB_STATUSES), or_(Job.owner_id == user.id, Job.dataset_id.in_(datasets)))
        .order_by(Job.created_at)
    ).all()
    if active:
        shown = ", ".join(active[:5]) + (", ..." if len(active) > 5 else "")
        raise auth.UserError(
            f"user {user.name!r} has {len(active)} queued or running job(s) ({shown}): cancel them first "
            "(POST /api/v1/jobs/ID/cancel, or the job page) and delete the user once they have stopped"
        )
    keys = set(session.scalars(select(Dataset.storage_key).where(Dataset.owner_id == user.id)))
    keys |= set(session.scalars(select(Job.run_key).where(Job.owner_id == user.id)))
    keys |= set(session.scalars(select(Model.run_key).where(Model.owner_id == user.id)))
    auth.revoke_keys(session, session.scalars(select(ApiKey.id).where(ApiKey.user_id == user.id)).all())
    # The rest goes with the row (ON DELETE CASCADE): sessions, login links, keys, datasets, jobs, models.
    session.delete(user)
    session.flush()
    return sorted(k for k in keys if k)
