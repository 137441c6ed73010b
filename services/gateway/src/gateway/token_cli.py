"""`crm-token`: prints a dev-mode bearer token (HS256, issuer crm-dev, audience crm).

crm-token --sub u1 --roles sales_rep --team east --region cn-east
CRM_GATEWAY_DEV_JWT_SECRET must be set (the gateway's dev secret)."""

import argparse
import os
import sys
import time
from collections.abc import Sequence

import jwt
from crm_platform.config import data_dir

from gateway.security.settings import DEV_AUDIENCE, DEV_ISSUER


def issue_dev_token(
    *,
    secret: str,
    sub: str,
    roles: Sequence[str],
    team: str = "",
    region: str = "",
    name: str = "",
    ttl_seconds: int = 3600,
    now: float | None = None,
) -> str:
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": DEV_ISSUER,
        "aud": DEV_AUDIENCE,
        "sub": sub,
        "name": name or sub,
        "roles": list(roles),
        "team": team,
        "region": region,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_seconds,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def _local_secret() -> str:
    """The dev secret `make run` wrote into the data folder, if any."""
    path = data_dir() / "dev-jwt-secret"
    return path.read_text().strip() if path.is_file() else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crm-token", description="Print a dev-mode bearer token for the CRM gateway.")
    parser.add_argument("--sub", default="dev-admin", help="user id (sub claim)")
    parser.add_argument("--name", default="", help="display name")
    parser.add_argument("--roles", default="admin", help="comma-separated roles, e.g. sales_rep,marketing")
    parser.add_argument("--team", default="", help="team claim")
    parser.add_argument("--region", default="", help="region claim")
    parser.add_argument("--ttl", type=int, default=8 * 3600, help="lifetime in seconds")
    parser.add_argument("--secret", default=None, help="HS256 secret (default: $CRM_GATEWAY_DEV_JWT_SECRET)")
    args = parser.parse_args(argv)
    secret = args.secret or os.environ.get("CRM_GATEWAY_DEV_JWT_SECRET", "") or _local_secret()
    if len(secret) < 32:
        print(
            "crm-token: set CRM_GATEWAY_DEV_JWT_SECRET (at least 32 characters), pass --secret, "
            "or start the system once with `make run`",
            file=sys.stderr,
        )
        return 2
    roles = [role.strip() for role in args.roles.split(",") if role.strip()]
    if not roles:
        print("crm-token: --roles needs at least one role", file=sys.stderr)
        return 2
    if args.ttl <= 0:
        print("crm-token: --ttl must be positive", file=sys.stderr)
        return 2
    print(
        issue_dev_token(
            secret=secret,
            sub=args.sub,
            roles=roles,
            team=args.team,
            region=args.region,
            name=args.name,
            ttl_seconds=args.ttl,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
