"""The accounts service (客户与联系人)."""
