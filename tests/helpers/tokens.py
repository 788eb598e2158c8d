"""Admin tokens made directly in a server's database (as `fleet admin token create` does)."""

from __future__ import annotations


def create_admin_token(ctx, role: str = "admin") -> str:
    from server.admin.service import CLI_PRINCIPAL, AdminService
    from server.admin.tables import Role

    with ctx.db.session_scope() as session:
        return AdminService(session).create_token(f"test-{role}", Role(role), CLI_PRINCIPAL).token
