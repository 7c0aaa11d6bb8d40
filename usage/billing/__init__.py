"""Billing: the money side of a metered call, one module per concern.

    calls        CallPlan, CallOutcome, CallMeta: what travels between the steps
    holds        before a call: quota, key budget, worst-case cost, the hold
    recording    after it: the record, the charge, the ledger entry, counters and rollup in one transaction
    counters     counters, key counters, daily rollups, quota alerts, the rollup repair
    ledger       accounts, grants, the conditional hold/settle UPDATEs, charges
    reconcile    holds left behind
    consumption  tokens other services report
    keys         API keys

Money rules (PostgreSQL is the source of truth; Redis is never consulted for money):
- a hold is a conditional UPDATE (`balance - reserved >= amount`), so concurrent calls can never over-commit;
- the record, the charge, the ledger entry, the counters and the rollup are written in ONE transaction;
- CHECK constraints (balance >= 0, reserved <= balance) back every UPDATE.
"""
