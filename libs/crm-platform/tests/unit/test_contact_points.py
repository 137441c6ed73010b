"""Email and phone matching keys, shared by every context (a lead meets a contact on them)."""

import pytest
from crm_platform.contact_points import normalise_email, normalise_phone, split_country_code
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


def fullwidth(ascii_text: str) -> str:
    """`ascii_text` as a Chinese IME types it in full-width mode ('1' -> U+FF11, ' ' -> U+3000)."""
    return "".join("\u3000" if c == " " else chr(ord(c) + 0xFEE0) for c in ascii_text)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("138 0013 8000", "+8613800138000"),
        ("+86 138-0013-8000", "+8613800138000"),
        ("0086 13800138000", "+8613800138000"),
        ("(010) 6552 9988", "+861065529988"),
        ("010-12345678", "+861012345678"),
        ("+1 (415) 555-0100", "+14155550100"),
        # the default country's code written without '+' or '00', before a complete national number
        ("86 13800138000", "+8613800138000"),
        ("8613800138000", "+8613800138000"),
        ("086-13800138000", "+8613800138000"),
        ("86 10 1234 5678", "+861012345678"),
        # full-width digits, plus and spaces from a Chinese IME
        (fullwidth("13800138000"), "+8613800138000"),
        (fullwidth("+86 138 0013 8000"), "+8613800138000"),
        # the trunk 0 is not part of the number after a country code
        ("+86 (0)10 1234 5678", "+861012345678"),
        ("+86 010 1234 5678", "+861012345678"),
        ("(+86) 138 0013 8000", "+8613800138000"),
        # an extension is not part of the line
        ("010-12345678-801", "+861012345678"),
        ("010-12345678转801", "+861012345678"),
        ("010-12345678 ext 801", "+861012345678"),
        ("010-12345678 ext. 801", "+861012345678"),
        ("010-12345678 EXT.801", "+861012345678"),
        ("010-12345678 x801", "+861012345678"),
        ("010-12345678#801", "+861012345678"),
        ("0755-8888-1234", "+8675588881234"),
        ("0571-888-8888", "+865718888888"),
        ("138-0013-8000", "+8613800138000"),
        ("+1 (415) 555-0100 ext. 12", "+14155550100"),
        # Hong Kong, Macau and Taiwan written without '+': their own country code, not +86
        ("852 9123 4567", "+85291234567"),
        ("853 6612 3456", "+85366123456"),
        ("886 912 345 678", "+886912345678"),
        ("+852 9123 4567", "+85291234567"),
    ],
)
def test_phone_numbers_become_e164(raw: str, expected: str) -> None:
    assert normalise_phone(raw) == expected


def test_a_national_number_takes_the_configured_country() -> None:
    assert normalise_phone("(415) 555-0100", default_country="1") == "+14155550100"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "abc",
        "n/a",
        "12",
        "+1 555 CALL NOW",
        "1234567890123456789",
        # not a Chinese mobile (11 digits, 1[3-9]) nor a landline (area code and 7-8 digits)
        "1234567",
        "11111111",
        "138001380001",
        "12800138000",
        "010-123456",
        "+86 138001380001",
        "+86 12345",
        # a country code never starts with 0
        "+0 12345678",
        "000 12345678",
        # 852 with too few digits is neither Hong Kong nor a Chinese number
        "852 9123 456",
    ],
)
def test_malformed_phones_are_rejected(raw: str) -> None:
    with pytest.raises(ValueError, match="phone number"):
        normalise_phone(raw)


_VALID_PHONES = st.one_of(
    st.from_regex(r"\+[1-79][0-9]{9,12}", fullmatch=True),
    st.from_regex(r"(\+86 ?|0086|86)?1[3-9][0-9]{9}", fullmatch=True),
    st.from_regex(r"(\+86 ?)?0(10|2[0-9])-?[0-9]{8}", fullmatch=True),
    st.from_regex(r"852 ?[0-9]{8}", fullmatch=True),
)


@given(_VALID_PHONES)
def test_phone_normalisation_is_idempotent(raw: str) -> None:
    once = normalise_phone(raw)
    assert normalise_phone(once) == once


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Li.Lei@Example.COM ", "li.lei@example.com"),
        # full-width letters from a Chinese IME, and invisible characters pasted along
        (fullwidth("A@x.cn"), "a@x.cn"),
        ("\u200ba@x.cn", "a@x.cn"),
        ("\ufeffa@x.cn\u200d", "a@x.cn"),
        # an IDN domain is keyed by its punycode, however it was written
        ("user@bücher.de", "user@xn--bcher-kva.de"),
        ("user@BÜCHER.de", "user@xn--bcher-kva.de"),
        ("user@xn--bcher-kva.de", "user@xn--bcher-kva.de"),
        ("User@XN--BCHER-KVA.DE", "user@xn--bcher-kva.de"),
        ("a+tag@x.cn", "a+tag@x.cn"),
    ],
)
def test_emails_become_their_key(raw: str, expected: str) -> None:
    assert normalise_email(raw) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "no-at-sign",
        "a@b",
        "two@@example.com",
        "sp ace@example.com",
        "x" * 250 + "@a.com",
        # annotations and characters that cannot appear unquoted
        "a@163.com" + fullwidth("(") + "工作" + fullwidth(")"),
        "a@163.com(work)",
        "a@163.com 【工作】",
        "a<b>@x.cn",
        "Li Lei <a@x.cn>",
        "a,b@x.cn",
        'a"b@x.cn',
        "a;b@x.cn",
        # empty labels
        "a@x..cn",
        "a@.x.cn",
        "a@x.cn.",
        "a..b@x.cn",
        ".a@x.cn",
        "@x.cn",
        "a@",
        "a@-x.cn",
    ],
)
def test_malformed_emails_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="email address"):
        normalise_email(bad)


@pytest.mark.parametrize(
    ("digits", "country", "national"),
    [
        ("8613800138000", "86", "13800138000"),
        ("14155552671", "1", "4155552671"),
        ("79161234567", "7", "9161234567"),
        ("442079460958", "44", "2079460958"),
        ("85291234567", "852", "91234567"),
        ("886912345678", "886", "912345678"),
        ("97145551234", "971", "45551234"),
    ],
)
def test_an_international_number_splits_into_its_country_code_and_national_number(
    digits: str, country: str, national: str
) -> None:
    assert split_country_code(digits) == (country, national)
