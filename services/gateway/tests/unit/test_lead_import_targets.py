"""The fields an import would set, which the gateway checks against the caller's write rights before
the leads service sees the file, as that service files them."""

from crm.leads.v1 import leads_service_pb2 as pb
from gateway.routers.leads import _import_columns, _import_targets

HEADER = pb.ImportHeader()


def test_a_json_rows_custom_keys_are_checked_as_given_as_the_service_files_them() -> None:
    body = b'[{"name": "Li", "custom": {"id__card": "110101199001011234", "Shoe size": "42"}}]'
    targets = _import_targets(HEADER, _import_columns("json", body, 0))
    assert {"custom.id__card", "custom.Shoe size"} <= set(targets)
    assert "custom.id_card" not in targets


def test_a_csv_column_no_field_takes_is_checked_under_its_normalised_custom_key() -> None:
    targets = _import_targets(HEADER, _import_columns("csv", b"name,id__card,Shoe size\nLi,1,42\n", 0))
    assert {"custom.id_card", "custom.shoe_size", "name"} <= set(targets)


def test_json_lines_custom_keys_are_checked_as_given_too() -> None:
    body = b'{"name": "Li"}\n{"name": "Wu", "custom": {"id__card": "1"}}\n'
    assert "custom.id__card" in _import_targets(HEADER, _import_columns("jsonl", body, 0))
