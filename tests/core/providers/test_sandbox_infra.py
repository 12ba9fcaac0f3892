"""The sandbox's own machinery: scenario files, seeded faults, the pause gate, TLS, loopback only."""

from __future__ import annotations

import ast
import asyncio
import ipaddress
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from sandbox.__main__ import serve
from sandbox.state import SandboxState, ScenarioError, load_scenario
from sandbox.tls import ensure_tls

ROOT = Path(__file__).resolve().parents[3]


def test_the_sandbox_imports_nothing_from_core() -> None:
    for path in (ROOT / "sandbox").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "core" or n.startswith("core.") for n in names), f"{path.name} imports core"


def test_scenario_files_merge_siblings_and_includes_and_refuse_clashes(tmp_path: Path) -> None:
    (tmp_path / "sandbox.yaml").write_text(yaml.safe_dump(
        {"seed": 1, "include": ["extra.yaml"], "salesforce": {"orgs": {"a": {"name": "A"}}}}))
    (tmp_path / "sandbox.dynamics.yaml").write_text(yaml.safe_dump({"dynamics": {"environments": {"d": {}}}}))
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump({"salesforce": {"orgs": {"b": {"name": "B"}}}}))
    merged = load_scenario(tmp_path / "sandbox.yaml")
    assert set(merged["salesforce"]["orgs"]) == {"a", "b"} and "d" in merged["dynamics"]["environments"]
    (tmp_path / "sandbox.clash.yaml").write_text(yaml.safe_dump({"salesforce": {"orgs": {"a": {}}}}))
    with pytest.raises(ScenarioError, match="defined twice"):
        load_scenario(tmp_path / "sandbox.yaml")


def test_the_demo_scenario_matches_the_demo_tenants() -> None:
    scenario = load_scenario(ROOT / "data" / "demo" / "sandbox.yaml")
    orgs = scenario["salesforce"]["orgs"]
    assert {"tinyco", "profco", "bigcorp-emea", "bigcorp-americas", "newco"} <= set(orgs)
    tiny = {lic["name"]: lic for lic in orgs["tinyco"]["licenses"]}
    assert (tiny["Salesforce"]["used"], tiny["Salesforce"]["total"]) == (10, 10)
    assert (tiny["Salesforce Integration"]["used"], tiny["Salesforce Integration"]["total"]) == (0, 5)
    assert len(orgs["tinyco"]["users"]) == 10
    assert orgs["profco"]["edition"] == "professional" and orgs["profco"]["api_enabled"] is False
    tenants = yaml.safe_load((ROOT / "data" / "demo" / "tenants.yaml").read_text())["tenants"]
    sandbox_ids = {u.get("id") for org in orgs.values() for u in org["users"]}
    for t in tenants:
        for a in t.get("crm_accounts", []):
            if a["provider"] == "salesforce":
                assert a["org"] in orgs, f"tenant {t['slug']} uses org {a['org']} the sandbox does not play"
                users = [u for u in t.get("users", []) if u.get("crm_user_id")]
                for u in users:
                    if u.get("account", a["label"]) == a["label"]:
                        assert u["crm_user_id"] in sandbox_ids, f"{u['email']} has no CRM user in the sandbox"


def _calls(state: SandboxState, org: str, n: int) -> list[int | None]:
    async def run() -> list[int | None]:
        return [await state.before_call(org) for _ in range(n)]

    return asyncio.run(run())


def test_injected_5xx_are_seeded() -> None:
    a, b, c = (SandboxState({"salesforce": {}}, seed=s) for s in (7, 7, 8))
    for st in (a, b, c):
        st.set_faults("x", error_rate=0.3, error_status=502)
    first, second, other = _calls(a, "x", 50), _calls(b, "x", 50), _calls(c, "x", 50)
    assert first == second and first != other
    assert set(first) == {None, 502} and 5 < first.count(502) < 30
    assert _calls(a, "y", 20) == [None] * 20  # faults are per org


def test_pause_after_batch_holds_writes_until_released() -> None:
    state = SandboxState({}, seed=1)
    state.set_faults("x", pause_after_batch=2)

    async def scenario() -> list[str]:
        order: list[str] = []

        async def batch(i: int) -> None:
            await state.batch_gate("x")
            order.append(f"batch {i}")

        await batch(1)
        await batch(2)
        third = asyncio.create_task(batch(3))
        assert await state.wait_paused("x", timeout=5)
        order.append("paused")
        assert state.release("x") == 1
        await third
        await batch(4)  # the pause is gone after release
        return order

    assert asyncio.run(scenario()) == ["batch 1", "batch 2", "paused", "batch 3", "batch 4"]


def test_tls_files_are_made_once_and_chain_to_the_ca(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_file.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert oct(files.key_file.stat().st_mode & 0o777) == "0o600"
    again = ensure_tls(tmp_path)
    assert again.ca_file.read_bytes() == files.ca_file.read_bytes()
    assert again.cert_file.read_bytes() == files.cert_file.read_bytes()


def test_the_sandbox_binds_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="loopback"):
        serve("0.0.0.0", 0, ROOT / "data" / "demo" / "sandbox.yaml", tmp_path)


def test_admin_api_sets_inspects_and_clears_faults(sandbox) -> None:
    assert set(sandbox.http.get("/_sandbox/health").json()["vendors"]) >= {"salesforce"}
    sandbox.fault("tinyco", latency_ms=1, quota_exhausted=True)
    view = sandbox.inspect("tinyco")
    assert view["runtime"]["faults"]["quota_exhausted"] is True and view["salesforce"]["api_limit"] == 110_000
    bad = sandbox.http.post("/_sandbox/faults/tinyco", json={"volcano": True})
    assert bad.status_code == 400 and "unknown fault" in bad.text
    sandbox.clear_faults("tinyco")
    assert sandbox.inspect("tinyco")["runtime"]["faults"]["quota_exhausted"] is False
