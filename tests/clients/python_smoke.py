"""The generated Python client against a running tracker: the document is
usable by an off-the-shelf generator (openapi-python-client), not only
valid. Run by tests/api/clients.rs with the generated package on
PYTHONPATH; arguments: base URL, admin token, client token, entitlement id.
Prints one line per step and exits non-zero at the first surprise."""

import sys

from headroom_client import AuthenticatedClient
from headroom_client.api.entitlements import get_entitlement, put_entitlement
from headroom_client.api.evidence import overdraft_report
from headroom_client.api.metering import activate_seat
from headroom_client.models import (
    EntitlementConfig,
    EntitlementView,
    Outcome,
    Problem,
    Report,
    SeatConfig,
    SeatDecision,
)

base, admin_token, client_token, entitlement = sys.argv[1:5]
admin = AuthenticatedClient(base_url=base, token=admin_token)
client = AuthenticatedClient(base_url=base, token=client_token)


def expect(what, value, wanted):
    if value != wanted:
        sys.exit(f"{what}: {value!r}, wanted {wanted!r}")
    print(f"{what}: {value}")


# Create: 2 seats bought, up to 3 allowed.
config = EntitlementConfig(seats=SeatConfig(purchased=2, hard_cap=3))
answer = put_entitlement.sync_detailed(entitlement, client=admin, body=config)
expect("put status", answer.status_code, 201)
view = answer.parsed
if not isinstance(view, EntitlementView):
    sys.exit(f"put answered {view!r}")
expect("purchased", view.seats.purchased, 2)

# Activate past the cap: two within the purchase, one in overdraft, the
# fourth denied (429, a problem carrying the decision).
outcomes = []
for seat in ["alice", "bob", "carol", "dave"]:
    answer = activate_seat.sync_detailed(entitlement, seat, client=client)
    decision = answer.parsed
    if isinstance(decision, Problem):
        expect(f"{seat} status", answer.status_code, 429)
        expect(f"{seat} problem code", decision.code, "denied")
        decision = decision.decision
    if not isinstance(decision, SeatDecision):
        sys.exit(f"{seat}: no seat decision in {answer.content!r}")
    outcomes.append(decision.outcome)
expect(
    "outcomes",
    outcomes,
    [Outcome.GRANTED, Outcome.GRANTED, Outcome.OVERDRAFT, Outcome.DENIED],
)

view = get_entitlement.sync(entitlement, client=admin)
expect("in use", view.seats.in_use, 3)

# The report names the entitlement in overdraft, with the denial counted.
report = overdraft_report.sync(client=admin, limit=1000)
if not isinstance(report, Report):
    sys.exit(f"report answered {report!r}")
items = [item for item in report.items if item.entitlement == entitlement]
expect("in the report", len(items), 1)
expect("report in use", items[0].seats.in_use, 3)
expect("report overdraft", items[0].seats.overdraft, True)
expect("report denied", items[0].seats.denied_total, 1)
print("ok")
