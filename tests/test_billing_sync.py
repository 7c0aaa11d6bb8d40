"""manage.py sync_usage against a real HTTP receiver on loopback: once per record, resumable, retried."""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from tests.factories import make_user
from tests.fixtures_usage import simulate_call
from usage.models import BillingSyncState, UsageRecord


def _records(users, n):
    for i in range(n):
        simulate_call(users[i % len(users)], prompt=10 + i, completion=i)


def _sync(receiver, *args):
    out = io.StringIO()
    call_command("sync_usage", "--url", receiver.url, "--batch-size", "4", "--backoff", "0.01", *args, stdout=out,
                 stderr=io.StringIO())
    return out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_sync_twice_sends_each_record_once(billing_receiver):
    users = [make_user("ann"), make_user("ben")]
    _records(users, 11)
    out = _sync(billing_receiver)
    assert "synced 11 records" in out and "ann" in out and "#" in out
    _sync(billing_receiver)
    sent = [i for _, ids in billing_receiver.received for i in ids]
    assert sorted(sent) == sorted(UsageRecord.objects.values_list("id", flat=True))  # each exactly once
    state = BillingSyncState.objects.get(user=users[0])
    assert state.status == "ok" and state.records_synced == 6 and state.pending_batch is None
    assert state.tokens_synced == sum(r.total_tokens for r in UsageRecord.objects.filter(user=users[0]))
    assert not UsageRecord.objects.filter(synced_at__isnull=True).exists()


@pytest.mark.django_db(transaction=True)
def test_user_filter_and_retries_with_backoff(billing_receiver):
    ann, ben = make_user("ann"), make_user("ben")
    _records([ann, ben], 4)
    billing_receiver.fail_next = 2
    _sync(billing_receiver, "--user", "ann")
    assert billing_receiver.accepted_ids() == sorted(UsageRecord.objects.filter(user=ann).values_list("id", flat=True))
    assert len(billing_receiver.received) == 3  # two 500s, then accepted under the same key
    assert len({key for key, _ in billing_receiver.received}) == 1
    assert UsageRecord.objects.filter(user=ben, synced_at__isnull=True).count() == 2


@pytest.mark.django_db(transaction=True)
def test_backend_down_marks_the_user_failed_and_a_later_run_resumes(billing_receiver):
    ann = make_user("ann")
    _records([ann], 3)
    billing_receiver.fail_next = 100
    with pytest.raises(CommandError):
        _sync(billing_receiver, "--retries", "1")
    state = BillingSyncState.objects.get(user=ann)
    assert state.status == "failed" and "HTTP 500" in state.error and state.pending_batch
    billing_receiver.fail_next = 0
    _sync(billing_receiver)
    assert billing_receiver.accepted_ids() == sorted(UsageRecord.objects.values_list("id", flat=True))
    assert len({key for key, _ in billing_receiver.received}) == 1  # the failed batch was resent, same key


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_sync_killed_midway_then_resumed_sends_nothing_twice(billing_receiver):
    users = [make_user("ann"), make_user("ben")]
    _records(users, 20)
    root = Path(__file__).resolve().parent.parent
    db = connection.settings_dict
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"}
    proc = subprocess.Popen([sys.executable, "manage.py", "sync_usage", "--url", billing_receiver.url,
                             "--batch-size", "3"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def kill_on_third(n, key):
        if n == 3:  # the batch has arrived; the sender dies before it can mark it synced
            os.kill(proc.pid, signal.SIGKILL)

    billing_receiver.on_batch = kill_on_third
    assert proc.wait(timeout=60) == -signal.SIGKILL
    billing_receiver.on_batch = None
    assert UsageRecord.objects.filter(synced_at__isnull=True).exists()
    _sync(billing_receiver)
    # Every record reached the backend under exactly one batch key, and the backend holds each once.
    keys_per_record: dict[int, set[str]] = {}
    for key, ids in billing_receiver.received:
        for i in ids:
            keys_per_record.setdefault(i, set()).add(key)
    assert all(len(keys) == 1 for keys in keys_per_record.values())
    assert billing_receiver.accepted_ids() == sorted(UsageRecord.objects.values_list("id", flat=True))
    assert not UsageRecord.objects.filter(synced_at__isnull=True).exists()


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_two_syncs_at_once_never_send_a_record_twice(billing_receiver):
    users = [make_user("ann"), make_user("ben")]
    _records(users, 24)
    gate = threading.Barrier(2)

    def run():
        try:
            gate.wait(5)
            _sync(billing_receiver)
        finally:
            connection.close()

    billing_receiver.on_batch = lambda n, key: time.sleep(0.02)  # keep both runs overlapping
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sent = [i for _, ids in billing_receiver.received for i in ids]
    assert sorted(sent) == sorted(UsageRecord.objects.values_list("id", flat=True))  # each once, not once per run
    assert not UsageRecord.objects.filter(synced_at__isnull=True).exists()
    assert set(BillingSyncState.objects.values_list("status", flat=True)) == {"ok"}


@pytest.mark.pg
@pytest.mark.django_db(transaction=True)
def test_a_user_locked_by_another_run_is_skipped_not_failed(billing_receiver):
    import psycopg

    from usage.sync import _LOCK_NAMESPACE

    ann = make_user("ann")
    _records([ann], 2)
    db = connection.settings_dict
    with psycopg.connect(host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"],
                         autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, %s)", [_LOCK_NAMESPACE, ann.pk])
        out = _sync(billing_receiver)
        assert "ann: skipped" in out and billing_receiver.received == []
    # The other run's connection is gone (killed or finished): its lock went with it.
    assert "synced 2 records" in _sync(billing_receiver)


@pytest.mark.django_db(transaction=True)
def test_retry_delays_double_each_time(billing_receiver, monkeypatch):
    from usage import sync

    ann = make_user("ann")
    _records([ann], 2)
    delays = []
    monkeypatch.setattr(sync.time, "sleep", delays.append)  # record the backoff instead of waiting it out
    billing_receiver.fail_next = 3
    report = sync.sync_usage(url=billing_receiver.url, retries=4, backoff=0.5)
    assert delays == [0.5, 1.0, 2.0] and report.records == 2 and not report.failed
    assert len(billing_receiver.received) == 4 and len({key for key, _ in billing_receiver.received}) == 1
