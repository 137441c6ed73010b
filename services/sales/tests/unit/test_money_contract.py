"""Money never travels as a float: no field of any sales message — resources, requests, events,
the ERP inbound messages — nor of the common types is a float or a double (SPEC §6)."""

import pkgutil
from importlib import import_module

import crm.common.v1
import crm.erp.v1
import crm.sales.v1
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

pytestmark = pytest.mark.unit

FLOATING = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}


def _messages() -> list[Descriptor]:
    found: list[Descriptor] = []
    for package in (crm.common.v1, crm.sales.v1, crm.erp.v1):
        for module in pkgutil.iter_modules(package.__path__):
            if module.name.endswith("_pb2"):
                file = import_module(f"{package.__name__}.{module.name}").DESCRIPTOR
                pending = list(file.message_types_by_name.values())
                while pending:
                    message = pending.pop()
                    found.append(message)
                    pending.extend(message.nested_types)
    return found


def test_no_sales_message_has_a_floating_point_field() -> None:
    messages = _messages()
    assert len(messages) > 50  # the walk really saw the contracts
    floating = [
        f"{message.full_name}.{field.name}"
        for message in messages
        for field in message.fields
        if field.type in FLOATING
    ]
    assert floating == []


def test_every_amount_like_field_is_money_or_a_decimal_string() -> None:
    names = ("amount", "total", "price", "paid", "outstanding", "overdue", "invoiced")
    odd = [
        f"{message.full_name}.{field.name}"
        for message in _messages()
        for field in message.fields
        if any(word in field.name for word in names)
        and not field.name.endswith(("_count", "_id", "_at", "_ids"))
        and field.type != FieldDescriptor.TYPE_STRING
        and not (field.message_type and field.message_type.full_name == "crm.common.v1.Money")
    ]
    assert odd == []
