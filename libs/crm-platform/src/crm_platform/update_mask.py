"""Update masks: which fields an update writes, checked the same way in every service."""

from collections.abc import Collection, Iterable

from crm_platform.errors import FieldError, ValidationFailed


def writable_paths(
    paths: Iterable[str], writable: Collection[str], *, what: str = "field", keyed: bool = False
) -> list[str]:
    """The paths of an update mask, or 422: each must name a writable field (with `keyed`,
    `custom.<key>` names one key of the writable field `custom`), and at least one must be given."""
    given = list(paths)
    unknown = [path for path in given if (path.split(".", 1)[0] if keyed else path) not in writable]
    if unknown:
        raise ValidationFailed([FieldError(path, f"is not a writable {what}") for path in unknown])
    if not given:
        raise ValidationFailed([FieldError("update_mask", "names no field to update")])
    return given
