"""Services (state changes) and selectors (reads) against the database."""

import itertools
import re
from datetime import datetime, timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from rooms import hub, prepared, selectors, services
from rooms.models import Message, Nickname, Presence, Room, name_key
from rooms.protocol import timestamp

pytestmark = pytest.mark.django_db


def connect(channel_name: str, *, process: str = "proc-a", worker: str = "w1") -> services.Seat:
    return services.presence_connect(channel_name=channel_name, process=process, worker=worker)


def named(channel_name: str, nick: str, **kwargs) -> services.Seat:
    connect(channel_name, **kwargs)
    return services.nick_set(channel_name=channel_name, nick=nick)[1]


# --- connect and disconnect -----------------------------------------------------------------


def test_presence_connect_seats_in_default_room_under_a_random_user_nick():
    seat = connect("c1")
    assert seat.room_name == "Default"
    assert re.fullmatch(r"User\d+", seat.nick)
    row = Presence.objects.get(channel_name="c1")
    assert (row.nick, row.nick_key, row.room_id) == (seat.nick, seat.nick.casefold(), seat.room_id)
    assert (row.process, row.worker) == ("proc-a", "w1")
    # Only chosen nicks are recorded for moderators, not every guest's random one.
    assert not Nickname.objects.filter(key=name_key(seat.nick)).exists()


def test_presence_connect_retries_when_the_random_nick_is_taken(monkeypatch):
    first = connect("c1")
    taken = int(first.nick.removeprefix("User"))
    draws = iter([taken, taken, 42])
    monkeypatch.setattr(services.secrets, "randbelow", lambda _n: next(draws))
    second = connect("c2")
    assert second.nick == "User42"
    assert Presence.objects.count() == 2


def test_presence_disconnect_removes_the_row_and_returns_the_departure():
    seat = named("c1", "alice")
    gone = services.presence_disconnect(channel_name="c1")
    assert gone == services.Departure(
        nick="alice", room_id=seat.room_id, room_name="Default", process="proc-a"
    )
    assert not Presence.objects.exists()


def test_presence_disconnect_of_an_unknown_connection_returns_none():
    assert services.presence_disconnect(channel_name="nobody") is None


def test_presence_disconnect_records_when_a_chosen_nick_was_last_seen():
    named("c1", "alice")
    Nickname.objects.filter(key="alice").update(last_seen=timezone.now() - timedelta(days=1))
    services.presence_disconnect(channel_name="c1")
    assert timezone.now() - Nickname.objects.get(key="alice").last_seen < timedelta(minutes=1)


def test_presence_disconnect_frees_the_nick():
    named("c1", "alice")
    services.presence_disconnect(channel_name="c1")
    assert named("c2", "Alice").nick == "Alice"


on_postgres = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="relaxed commits exist on PostgreSQL only (tests/e2e/test_postgres_services.py)",
)
prepares = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="prepared statements are PostgreSQL's (tests/e2e/test_postgres_services.py)",
)
on_sqlite = pytest.mark.skipif(
    connection.vendor != "sqlite", reason="the read-then-write room switch is SQLite's"
)


def test_connect_room_switch_and_disconnect_run_without_a_transaction():
    # PostgreSQL does each in one statement; SQLite reads before it switches rooms, and
    # updates the nickname apart from the DELETE.
    statements = {"postgresql": (1, 1, 1), "sqlite": (1, 2, 2)}[connection.vendor]
    connect("c0")  # the Default room exists from here on
    Room.objects.create(name="math")
    with CaptureQueriesContext(connection) as connecting:
        seat = connect("c1")
    with CaptureQueriesContext(connection) as switching:
        old, new = services.room_join(channel_name="c1", room_name="math")
    with CaptureQueriesContext(connection) as leaving:
        gone = services.presence_disconnect(channel_name="c1")

    assert (len(connecting), len(switching), len(leaving)) == statements
    for captured in (connecting, switching, leaving):
        assert not [q for q in captured if re.match(r"(BEGIN|SAVEPOINT)", q["sql"], re.I)]
    assert (old, new.room_name) == (seat, "math")
    assert gone == services.Departure(
        nick=seat.nick, room_id=new.room_id, room_name="math", process="proc-a"
    )


@on_sqlite
def test_a_room_switch_whose_presence_changed_after_it_was_read_is_decided_under_lock(
    monkeypatch,
):
    connect("c1")
    math = Room.objects.create(name="math")
    execute = services._execute

    def moved_meanwhile(cursor, statement, params):
        execute(cursor, statement, params)
        if statement == "where":
            # Another switch lands between the read and the guarded write.
            Presence.objects.filter(channel_name="c1").update(room_id=math.pk)

    monkeypatch.setattr(services, "_execute", moved_meanwhile)
    with pytest.raises(services.AlreadyInRoom):
        services.room_join(channel_name="c1", room_name="math")


@on_postgres
@pytest.mark.django_db(transaction=True)
def test_on_postgres_relaxed_commits_leave_the_session_setting_alone():
    def durability() -> str:
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            return cursor.fetchone()[0]

    before = durability()
    connect("c1")
    services.room_join(channel_name="c1", room_name="math")
    services.room_join(channel_name="c1", room_name="Default")
    services.presence_disconnect(channel_name="c1")
    assert durability() == before == "on"


def _prepared_statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


def _as_sent(statement: str) -> str:
    """A statement as psycopg sends it bound on the server: %s and %b become $1, $2, ..."""
    numbers = itertools.count(1)
    return re.sub("%[sb]", lambda _: f"${next(numbers)}", statement)


@prepares
def test_on_postgres_what_every_connection_runs_is_prepared_once_per_database_connection():
    connect("c0")  # the Default room exists from here on
    Room.objects.create(name="math")
    before = _prepared_statements()
    connect("c1")
    services.room_join(channel_name="c1", room_name="math")
    selectors.message_history(room_name="math", limit=5)
    services.presence_disconnect(channel_name="c1")
    connect("c2")  # a second connect reuses what the first prepared

    hot = services._sql("postgresql")
    prepared = _prepared_statements()
    for name in ("seat_now", "move_now", "unseat_now"):
        assert prepared.count(_as_sent(hot[name])) == 1, name
    assert any(s.startswith("SELECT id, author, text, created_at FROM") for s in prepared)
    assert len(prepared) == len(before) + 3  # move_now, the history page, unseat_now


@prepares
def test_on_postgres_messages_are_stored_by_one_prepared_statement_whatever_the_batch_size():
    seat = connect("c1")
    for size in (1, 3, 2, 7):
        services.messages_create(
            posts=[post_in(seat, "c1", seat.nick, f"{size}/{i}") for i in range(size)],
            check_presence=False,
        )
    insert = _as_sent(services._sql("postgresql")["post_arrays"])
    assert _prepared_statements().count(insert) == 1
    assert list(Message.objects.order_by("pk").values_list("text", flat=True)) == [
        f"{size}/{i}" for size in (1, 3, 2, 7) for i in range(size)
    ]


@prepares
def test_on_postgres_nothing_is_prepared_when_turned_off(monkeypatch):
    monkeypatch.setattr(connection.connection, "prepare_threshold", None)  # CHAT_DB_PREPARE=0
    connect("c1")
    services.room_join(channel_name="c1", room_name="math")
    services.presence_disconnect(channel_name="c1")
    assert _prepared_statements() == []


@prepares
def test_on_postgres_a_failed_prepared_statement_is_a_django_error_and_changes_nothing():
    named("c1", "alice")
    seat = connect("c2")
    rename = services._sql("postgresql")["rename"]
    for _attempt in range(2):  # refused once prepared as well as when first prepared
        with pytest.raises(IntegrityError), transaction.atomic(), prepared.cursor() as cursor:
            cursor.execute(rename, ["alice", name_key("alice"), "c2"])
    assert Presence.objects.get(channel_name="c2").nick == seat.nick
    assert services.nick_set(channel_name="c2", nick="bob")[0] == seat.nick


# --- nicks ----------------------------------------------------------------------------------


def test_nick_set_returns_previous_nick_and_new_seat():
    seat = connect("c1")
    previous, new = services.nick_set(channel_name="c1", nick="alice")
    assert previous == seat.nick
    assert new == services.Seat(nick="alice", room_id=seat.room_id, room_name="Default")
    assert Presence.objects.get(channel_name="c1").nick == "alice"
    assert Nickname.objects.filter(key="alice", name="alice").exists()


def test_nick_set_second_claim_of_one_nick_raises_nick_in_use_and_changes_nothing():
    named("c1", "alice")
    loser = connect("c2")
    with pytest.raises(services.NickInUse):
        services.nick_set(channel_name="c2", nick="alice")
    assert Presence.objects.get(channel_name="c2").nick == loser.nick
    assert list(
        Presence.objects.filter(nick_key="alice").values_list("channel_name", flat=True)
    ) == ["c1"]
    # The refusal rolled back only its savepoint: the loser can still pick another nick.
    assert services.nick_set(channel_name="c2", nick="bob")[1].nick == "bob"


def test_nick_uniqueness_is_enforced_by_the_database_not_a_prior_check():
    # What makes the race safe: two rows can never hold one nick key, whoever writes first.
    seat = connect("c1")
    room = Room.objects.get(pk=seat.room_id)
    Presence.objects.create(
        channel_name="x1", process="p", worker="w", nick="Zed", nick_key="zed", room=room
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        Presence.objects.create(
            channel_name="x2", process="p", worker="w", nick="ZED", nick_key="zed", room=room
        )


def test_nick_set_race_loser_gets_nick_in_use_when_the_rival_writes_after_its_read(monkeypatch):
    """The rival's claim lands after this claim read its row and before it writes: only the
    unique constraint can catch that, and it must surface as NickInUse, not IntegrityError."""
    connect("c1")
    loser = connect("c2")
    real_name_key = services.name_key
    raced = []

    def name_key_after_rival(name):
        if not raced:
            raced.append(name)
            services.nick_set(channel_name="c1", nick="alice")
        return real_name_key(name)

    monkeypatch.setattr(services, "name_key", name_key_after_rival)
    with pytest.raises(services.NickInUse):
        services.nick_set(channel_name="c2", nick="ALICE")
    assert raced == ["ALICE"]
    # (Both run on one connection here, so the loser's rollback also undoes the rival.)
    assert Presence.objects.get(channel_name="c2").nick == loser.nick


@pytest.mark.parametrize("other", ["ALICE", "Alice", "aLiCe", "\uff41\uff4c\uff49\uff43\uff45"])
def test_nick_set_compares_nicks_case_and_width_insensitively(other):
    named("c1", "alice")
    connect("c2")
    with pytest.raises(services.NickInUse):
        services.nick_set(channel_name="c2", nick=other)


def test_nick_set_across_rooms_is_still_unique():
    named("c1", "alice")
    services.room_join(channel_name="c1", room_name="math")
    connect("c2")
    with pytest.raises(services.NickInUse):
        services.nick_set(channel_name="c2", nick="Alice")


def test_nick_set_to_own_nick_or_its_other_case_succeeds():
    named("c1", "alice")
    assert services.nick_set(channel_name="c1", nick="alice") == (
        "alice",
        services.Seat(nick="alice", room_id=Room.objects.get().pk, room_name="Default"),
    )
    previous, seat = services.nick_set(channel_name="c1", nick="Alice")
    assert (previous, seat.nick) == ("alice", "Alice")


def test_nick_set_for_a_swept_connection_raises_not_connected():
    with pytest.raises(services.NotConnected):
        services.nick_set(channel_name="gone", nick="alice")


# --- rooms ----------------------------------------------------------------------------------


def test_room_join_moves_the_presence_and_creates_the_room():
    seat = named("c1", "alice")
    old, new = services.room_join(channel_name="c1", room_name="数学")
    assert old == seat
    room = Room.objects.get(name="数学")
    assert new == services.Seat(nick="alice", room_id=room.pk, room_name="数学")
    assert Presence.objects.get(channel_name="c1").room_id == room.pk


def test_room_join_into_an_existing_room_and_back():
    seat = named("c1", "alice")
    named("c2", "bob")
    services.room_join(channel_name="c2", room_name="math")
    math = Room.objects.get(name="math")

    old, new = services.room_join(channel_name="c1", room_name="math")
    assert (old, new) == (seat, services.Seat(nick="alice", room_id=math.pk, room_name="math"))
    back = services.room_join(channel_name="c1", room_name="Default")
    assert back == (new, seat)
    assert Room.objects.count() == 2


def test_room_join_of_the_current_room_raises_already_in_room():
    connect("c1")
    with pytest.raises(services.AlreadyInRoom):
        services.room_join(channel_name="c1", room_name="Default")
    assert Presence.objects.get(channel_name="c1").room.name == "Default"


def test_room_join_keeps_connection_identity():
    named("c1", "alice", process="proc-z", worker="wz")
    before = Presence.objects.get(channel_name="c1")
    services.room_join(channel_name="c1", room_name="math")
    after = Presence.objects.get(channel_name="c1")
    assert (after.nick, after.nick_key, after.process, after.worker, after.connected_at) == (
        before.nick,
        before.nick_key,
        before.process,
        before.worker,
        before.connected_at,
    )


def test_room_users_are_in_the_order_they_entered_the_room():
    for channel, nick in [("c1", "ann"), ("c2", "bob"), ("c3", "cid")]:
        named(channel, nick)
    for channel in ["c2", "c1", "c3"]:
        services.room_join(channel_name=channel, room_name="math")
    assert selectors.room_users(room_name="math") == ["bob", "ann", "cid"]
    services.room_join(channel_name="c2", room_name="Default")
    services.room_join(channel_name="c2", room_name="math")
    assert selectors.room_users(room_name="math") == ["ann", "cid", "bob"]


def test_room_users_keeps_order_across_a_nick_change_and_is_empty_for_unknown_rooms():
    named("c1", "ann")
    named("c2", "bob")
    services.nick_set(channel_name="c1", nick="zoe")
    assert selectors.room_users(room_name="Default") == ["zoe", "bob"]
    assert selectors.room_users(room_name="nowhere") == []


def test_room_list_lists_occupied_rooms_busiest_first_then_by_name():
    for channel in ["c1", "c2", "c3", "c4", "c5", "c6"]:
        connect(channel)
    moves = [("c1", "zeta"), ("c2", "zeta"), ("c3", "alpha"), ("c4", "beta"), ("c6", "gamma")]
    moves += [("c5", "empty"), ("c5", "beta")]
    for channel, room in moves:
        services.room_join(channel_name=channel, room_name=room)
    # Default and empty exist but nobody is in them.
    assert selectors.room_list() == [
        {"room": "beta", "users": 2},
        {"room": "zeta", "users": 2},
        {"room": "alpha", "users": 1},
        {"room": "gamma", "users": 1},
    ]


# --- messages and history -------------------------------------------------------------------


@pytest.fixture
def rooms():
    default, _ = Room.objects.get_or_create(name="Default")
    other, _ = Room.objects.get_or_create(name="other")
    return default, other


def store(room: Room, author: str, text: str) -> services.StoredMessage:
    """One message stored the way the chat stores them (no presence needed)."""
    post = services.Post(
        channel_name="seed", room_id=room.pk, room_name=room.name, author=author, text=text
    )
    [message] = services.messages_create(posts=[post], check_presence=False)
    assert message is not None
    return message


def fill(room: Room, count: int) -> list[int]:
    return [store(room, "ann", f"m{i}").pk for i in range(count)]


def ids(page: list[dict]) -> list[int]:
    return [row["id"] for row in page]


def test_messages_create_stores_the_message():
    room = Room.objects.create(name="math")
    message = store(room, "ann", "hi\nthere")
    stored = Message.objects.get(pk=message.pk)
    assert (stored.room_id, stored.author, stored.text) == (room.pk, "ann", "hi\nthere")
    # The consumer builds `ts` from the returned instance, so the default must be read back.
    assert isinstance(message.created_at, datetime)
    assert message.created_at == stored.created_at


def test_message_history_rows_have_id_user_message_and_ts(rooms):
    default, _ = rooms
    message = Message.objects.get(pk=store(default, "ann", "hi").pk)
    assert selectors.message_history(room_name="Default", before=None, after=None, limit=5) == [
        {"id": message.pk, "user": "ann", "message": "hi", "ts": timestamp(message.created_at)}
    ]


def test_message_history_default_page_is_the_newest_messages_oldest_first(rooms):
    default, other = rooms
    made = fill(default, 8)
    fill(other, 3)
    page = selectors.message_history(room_name="Default", before=None, after=None, limit=5)
    assert ids(page) == made[-5:]


def test_message_history_before_is_the_newest_page_below_that_id(rooms):
    default, _ = rooms
    made = fill(default, 10)
    page = selectors.message_history(room_name="Default", before=made[6], after=None, limit=3)
    assert ids(page) == made[3:6]


def test_message_history_after_is_the_page_right_after_that_id(rooms):
    default, _ = rooms
    made = fill(default, 10)
    page = selectors.message_history(room_name="Default", before=None, after=made[2], limit=3)
    assert ids(page) == made[3:6]


def test_message_history_before_and_after_bound_the_newest_page_between(rooms):
    default, _ = rooms
    made = fill(default, 10)
    page = selectors.message_history(room_name="Default", before=made[8], after=made[1], limit=3)
    assert ids(page) == made[5:8]


def test_message_history_pages_walk_back_without_gaps(rooms):
    default, _ = rooms
    made = fill(default, 7)
    seen: list[int] = []
    before = None
    for _ in range(10):
        page = selectors.message_history(room_name="Default", before=before, after=None, limit=3)
        if not page:
            break
        seen = ids(page) + seen
        before = page[0]["id"]
    assert seen == made


def test_message_history_of_unknown_or_empty_room_is_empty(rooms):
    default, _ = rooms
    fill(default, 2)
    assert selectors.message_history(room_name="other", before=None, after=None, limit=5) == []
    assert selectors.message_history(room_name="nope", before=None, after=None, limit=5) == []


def test_message_history_never_mixes_rooms(rooms):
    default, other = rooms
    made_default = fill(default, 3)
    made_other = fill(other, 3)
    assert (
        ids(selectors.message_history(room_name="other", before=None, after=0, limit=50))
        == made_other
    )
    assert (
        ids(selectors.message_history(room_name="Default", before=None, after=None, limit=50))
        == made_default
    )


# --- heartbeat, sweep, restarts -------------------------------------------------------------


def age(channel_name: str, seconds: float) -> None:
    Presence.objects.filter(channel_name=channel_name).update(
        last_heartbeat=timezone.now() - timedelta(seconds=seconds)
    )


def test_presence_heartbeat_refreshes_only_its_process():
    connect("a1", process="pa")
    connect("a2", process="pa")
    connect("b1", process="pb")
    for channel in ["a1", "a2", "b1"]:
        age(channel, 100)
    assert services.presence_heartbeat(process="pa") == 2
    fresh = timezone.now() - timedelta(seconds=10)
    assert set(
        Presence.objects.filter(last_heartbeat__gt=fresh).values_list("channel_name", flat=True)
    ) == {"a1", "a2"}


def test_presence_sweep_removes_only_stale_rows_and_returns_their_departures():
    stale = named("s1", "stale1", process="dead")
    services.room_join(channel_name="s1", room_name="math")
    named("s2", "stale2", process="dead")
    named("f1", "fresh", process="live")
    age("s1", 60)
    age("s2", 60)
    age("f1", 2)
    gone = services.presence_sweep(timeout_seconds=30)
    math = Room.objects.get(name="math")
    assert sorted(gone, key=lambda d: d.nick) == [
        services.Departure(nick="stale1", room_id=math.pk, room_name="math", process="dead"),
        services.Departure(
            nick="stale2", room_id=stale.room_id, room_name="Default", process="dead"
        ),
    ]
    assert list(Presence.objects.values_list("channel_name", flat=True)) == ["f1"]
    assert services.presence_sweep(timeout_seconds=30) == []


def test_presence_sweep_frees_the_nicks_of_swept_connections():
    named("s1", "alice", process="dead")
    age("s1", 60)
    services.presence_sweep(timeout_seconds=30)
    assert named("c2", "alice").nick == "alice"


def test_presence_clear_worker_removes_only_earlier_incarnations_of_that_worker():
    named("old1", "old1", process="old-proc", worker="w1")
    named("old2", "old2", process="older-proc", worker="w1")
    named("new1", "new1", process="new-proc", worker="w1")
    named("oth1", "oth1", process="old-proc-2", worker="w2")
    gone = services.presence_clear_worker(worker="w1", keep_process="new-proc")
    assert sorted((d.nick, d.process, d.room_name) for d in gone) == [
        ("old1", "old-proc", "Default"),
        ("old2", "older-proc", "Default"),
    ]
    assert set(Presence.objects.values_list("channel_name", flat=True)) == {"new1", "oth1"}


def test_operations_on_a_swept_connection_raise_not_connected():
    connect("c1")
    age("c1", 60)
    services.presence_sweep(timeout_seconds=30)
    with pytest.raises(services.NotConnected):
        services.room_join(channel_name="c1", room_name="math")
    assert services.presence_disconnect(channel_name="c1") is None


# --- column sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nick",
    ["\ufdfa" * 20, "ß" * 20, "\u0390" * 20, "a" * 20],
    ids=["nfkc-18x", "sharp-s", "greek-iota", "ascii"],
)
def test_key_columns_fit_the_key_of_any_valid_nick(nick):
    """SQLite ignores max_length, PostgreSQL enforces it: a valid nick whose comparison key
    does not fit would be refused there with a database error."""
    from rooms.protocol import clean_name

    assert clean_name(nick) == nick
    key = name_key(nick)
    assert len(key) <= Presence._meta.get_field("nick_key").max_length
    assert len(key) <= Nickname._meta.get_field("key").max_length


def post_in(seat: services.Seat, channel_name: str, author: str, text: str) -> services.Post:
    """A post to the room of `seat`, from whichever connection is named."""
    return services.Post(
        channel_name=channel_name,
        room_id=seat.room_id,
        room_name=seat.room_name,
        author=author,
        text=text,
    )


def test_messages_create_skips_posts_of_swept_connections():
    seat = connect("c1")
    posts = [post_in(seat, "c1", seat.nick, "kept"), post_in(seat, "gone", "ghost", "lost")]
    kept, lost = services.messages_create(posts=posts)
    assert lost is None
    assert kept is not None and kept.pk is not None
    assert list(Message.objects.values_list("text", flat=True)) == ["kept"]


def test_messages_create_without_the_presence_check_stores_every_post():
    seat = connect("c1")
    posts = [post_in(seat, "c1", seat.nick, "one"), post_in(seat, "c2", "other", "two")]
    stored = services.messages_create(posts=posts, check_presence=False)
    texts = dict(Message.objects.values_list("pk", "text"))
    assert [texts[message.pk] for message in stored] == ["one", "two"]
    assert len(texts) == 2


def test_messages_create_stores_every_text_as_it_was_sent():
    seat = connect("c1")
    # What PostgreSQL's text format for arrays would have to quote or escape.
    texts = ["{a,b}", 'say "hi"', "back\\slash", "NULL", "", " padded ", "é ✓ 𝄞", "a,b\n{}"]
    posts = [post_in(seat, "c1", seat.nick, text) for text in texts]
    stored = services.messages_create(posts=posts, check_presence=False)
    rows = dict(Message.objects.values_list("pk", "text"))
    assert [rows[message.pk] for message in stored] == texts


# On PostgreSQL the largest batch the hub makes (one INSERT from arrays); on SQLite the largest
# multi-row VALUES list.
LARGEST_ONE_STATEMENT = (
    hub.MAX_BATCH if connection.vendor == "postgresql" else services._ROWS_PER_STATEMENT
)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("size", [3, LARGEST_ONE_STATEMENT])
def test_a_batch_of_messages_is_one_statement_that_commits_by_itself(monkeypatch, size):
    seat = connect("c1")
    commits = []
    commit = connection.commit
    monkeypatch.setattr(connection, "commit", lambda: (commits.append(1), commit()))
    posts = [post_in(seat, "c1", seat.nick, f"m{i}") for i in range(size)]
    with CaptureQueriesContext(connection) as queries:
        stored = services.messages_create(posts=posts, check_presence=False)
    table = connection.ops.quote_name(Message._meta.db_table)
    assert [q["sql"].split(" (")[0] for q in queries] == [f"INSERT INTO {table}"]
    assert commits == []  # autocommit: no transaction around it to commit
    assert list(Message.objects.order_by("pk").values_list("pk", "text", "created_at")) == [
        (message.pk, post.text, message.created_at)
        for post, message in zip(posts, stored, strict=True)
    ]


def test_a_batch_that_fails_inside_a_transaction_leaves_that_transaction_usable():
    seat = connect("c1")
    with transaction.atomic():
        with pytest.raises(IntegrityError):
            services.messages_create(
                posts=[post_in(seat, "c1", seat.nick, None)],  # type: ignore[arg-type]
                check_presence=False,
            )
        assert Presence.objects.filter(channel_name="c1").exists()
    assert not Message.objects.exists()


def test_messages_create_of_a_batch_larger_than_one_statement_keeps_every_post_in_order():
    seats = [connect(f"c{i}") for i in range(450)]
    posts = [
        post_in(seats[i], f"c{i}" if i % 7 else f"gone{i}", seats[i].nick, f"post {i}")
        for i in range(450)
    ]
    stored = services.messages_create(posts=posts)
    kept = [(post, message) for post, message in zip(posts, stored, strict=True) if message]
    assert [message is None for message in stored] == [i % 7 == 0 for i in range(450)]
    rows = dict(Message.objects.values_list("pk", "text"))
    assert [rows[message.pk] for _, message in kept] == [post.text for post, _ in kept]
    assert len({message.created_at for _, message in kept}) == 1
