"""The auth plugin: users in PostgreSQL, JWT issue/verify, revocation (memory + Redis).

* Register/Login hash and check passwords with argon2id in a bounded thread pool (never
  on the event loop, never holding a database connection, never logged).
* Verify never waits for I/O: header and key, signature and registered claims (≈ 16 µs
  for HS256), then the revoked tokens and users' cut-offs this pod holds in memory. Why
  there is no Redis claim cache (it was slower than the check it saved) is measured in
  :mod:`.cache`. Revocations reach every pod's memory through the ``TokenRevoked`` event;
  Redis keeps the shared list that a pod loads when it starts and re-reads every
  ``subject_refresh_s`` (for a pod that missed an event).
* Redis down: verification is unchanged, logouts hold through the event; the plugin stays
  ready and reports itself degraded (:meth:`AuthPlugin.degraded`, gauge ``aiwfe_auth_degraded``).
* Database down: Register/Login fail at once with ``Unavailable`` (retryable) while the
  breaker is open; Verify and Logout never touch the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from aiwfe.kernel.config_check import one_of
from aiwfe.kernel.errors import ConfigError, Overloaded, Unavailable
from aiwfe.kernel.plugin import Plugin, serves

from ._metrics import FAILURES, _plugins
from .admin import AdminOps, SubjectDenylist, admin_names
from .cache import ClaimCache, Denylist
from .contract import Claims, LoggedOut, Login, Logout, Register, Registered, SubjectRevoked, Token, TokenRevoked, Verify
from .errors import InvalidCredentials, InvalidInput, InvalidToken, TooManyAttempts, UserExists
from .kdf import KdfGate, _lower_thread_priority
from .keys import JwtKey, _material
from .store import USERNAME_RE, UserStore
from .throttle import LoginThrottle
from .tokens import ALGORITHMS, MIN_SECRET_BYTES, KeyRing, TokenService

__all__ = ["AuthPlugin", "JwtKey", "KdfGate"]

log = logging.getLogger("aiwfe.auth")

_MIN_PASSWORD, _MAX_PASSWORD = 8, 256


class AuthPlugin(AdminOps, Plugin):
    """Users, passwords, JWT access tokens, revocation. See the module docstring."""

    name = "auth"
    services = ("postgres", "redis")

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        """Settings (manifest ``[plugins.auth]``; string values may use ``${VAR:-default}``).

        ``database_url``/``redis_url`` empty: taken from ``DATABASE_URL``/``REDIS_URL``.
        ``redis_url`` empty everywhere: run without Redis (degraded). ``jwt_secret`` empty:
        ``JWT_SECRET``. ``jwt_algorithm`` HS256 signs with ``jwt_secret``; RS256/ES256/EdDSA
        sign with ``jwt_private_key`` (PEM) or ``jwt_private_key_file``. ``jwt_kid`` names the
        signing key; ``jwt_verify_keys`` are older keys still accepted (rotation).
        ``kdf_*``: argon2id cost (RFC 9106's low-memory profile by default), hashing threads,
        and the longest a password check may wait for them before Overloaded.
        ``kdf_priority``: CPU priority of the hashing threads (Linux; argon2's lane threads
        inherit it): ``idle`` (default, ``SCHED_IDLE``), ``low`` (nice + 10) or ``normal``.
        With ``idle`` a login burst hashes only on CPU time nothing else wants, so token
        checks and open sockets keep their latency; a CPU-starved hash shows in the gate's
        measured hash time, which turns further logins into 503 + Retry-After at once.
        ``login_*``: throttling (:mod:`.throttle`): attempts allowed per username and per
        client address before backoff, the first and longest lock, the window after which
        failures are forgotten. ``admin_users``: user names that may disable and delete users
        (plus ``$AIWFE_ADMIN_USERS``; see :mod:`.admin`). ``subject_refresh_s``: how often revoked tokens and
        disabled/deleted users' cut-offs are re-read from Redis (for a pod that missed an
        ``auth.revoked`` or ``auth.subject_revoked`` event).
        Measured with ``aiwfe bench auth-burst --replicas 1`` (2,000 handshakes + 200
        logins in one second, 2 cores): connect p99 ≈ 90–140 ms with ``idle``, ≈ 660 ms
        with ``low``, ≈ 1.2 s with ``normal``.
        """

        database_url: str = ""
        redis_url: str = ""
        redis_key_prefix: str = "aiwfe:auth"
        redis_timeout_s: float = 0.2
        redis_retry_s: float = 2.0
        redis_max_connections: int = 64
        jwt_algorithm: str = "HS256"
        jwt_secret: str = ""
        jwt_kid: str = "k1"
        jwt_private_key: str = ""
        jwt_private_key_file: str = ""
        jwt_verify_keys: list[JwtKey] = []
        issuer: str = "aiwfe"
        audience: str = "aiwfe"
        access_ttl_s: int = 3600
        leeway_s: float = 10.0
        default_scopes: list[str] = []
        pool_min: int = 1
        pool_max: int = 10
        pool_timeout_s: float = 2.0
        # At least Register's + Login's handler concurrency (64 + 64): a burst the handlers
        # admitted queues briefly for a connection (each holds one for a single statement)
        # instead of being refused; pool_timeout_s still bounds the wait.
        pool_max_waiting: int = 128
        db_connect_timeout_s: float = 2.0
        db_retry_s: float = 1.0
        db_start_timeout_s: float = 15.0
        kdf_time_cost: int = 3
        kdf_memory_kib: int = 65536
        kdf_parallelism: int = 4
        kdf_workers: int = 2
        kdf_max_wait_s: float = 2.0
        kdf_priority: Literal["idle", "low", "normal"] = "idle"
        login_user_attempts: int = 5
        login_addr_attempts: int = 20
        login_backoff_s: float = 1.0
        login_max_backoff_s: float = 900.0
        login_window_s: float = 900.0
        admin_users: list[str] = []
        subject_refresh_s: float = 30.0

    config: Config
    calls = (TokenRevoked, SubjectRevoked)

    @classmethod
    def validate_config(cls, config: Config) -> list[str | tuple[str, str]]:
        """Algorithms from :data:`~.tokens.ALGORITHMS`, the key material each needs, unique key
        ids, a long enough HS256 secret when one is configured, ``pool_min`` ≤ ``pool_max``."""
        algs = sorted(ALGORITHMS)
        problems = one_of("jwt_algorithm", config.jwt_algorithm, algs)
        if (
            config.jwt_algorithm in algs
            and config.jwt_algorithm != "HS256"
            and not (config.jwt_private_key or config.jwt_private_key_file)
        ):
            problems.append(f"jwt_private_key: {config.jwt_algorithm} needs jwt_private_key or jwt_private_key_file (PEM)")
        if config.jwt_private_key and config.jwt_private_key_file:
            problems.append("jwt_private_key_file: set jwt_private_key or jwt_private_key_file, not both")
        if config.jwt_algorithm == "HS256" and config.jwt_secret and len(config.jwt_secret.encode()) < MIN_SECRET_BYTES:
            problems.append(f"jwt_secret: must be at least {MIN_SECRET_BYTES} bytes")
        kids = [config.jwt_kid]
        for i, k in enumerate(config.jwt_verify_keys):
            problems += one_of(f"jwt_verify_keys[{i}].algorithm", k.algorithm, algs)
            if not (k.key or k.key_file):
                problems.append(f"jwt_verify_keys[{i}]: needs key or key_file")
            if k.kid in kids:
                problems.append(f"jwt_verify_keys[{i}].kid: {k.kid!r} is used twice")
            kids.append(k.kid)
        if config.pool_min > config.pool_max:
            problems.append(f"pool_min: {config.pool_min} is more than pool_max ({config.pool_max})")
        for field in ("login_user_attempts", "login_backoff_s", "login_window_s", "subject_refresh_s"):
            if getattr(config, field) <= 0:
                problems.append(f"{field}: must be positive")
        if config.login_addr_attempts < 0:
            problems.append("login_addr_attempts: must be 0 (off) or positive")
        if config.login_max_backoff_s < config.login_backoff_s:
            problems.append("login_max_backoff_s: must be at least login_backoff_s")
        return problems

    def __init__(self, config: msgspec.Struct, kernel: Any) -> None:
        super().__init__(config, kernel)
        self.tokens: TokenService | None = None
        self.store: UserStore | None = None
        self.cache: ClaimCache | None = None
        self.denylist = Denylist()
        self.subjects = SubjectDenylist()
        self.admins: frozenset[str] = frozenset()
        self.throttle: LoginThrottle | None = None
        self._kdf: ThreadPoolExecutor | None = None
        self._gate = KdfGate(1, 1.0)
        self._hasher: PasswordHasher | None = None
        self._dummy_hash = ""

    # -- lifecycle ------------------------------------------------------------------

    def _token_service(self) -> TokenService:
        c = self.config
        if c.jwt_algorithm == "HS256":
            signing = c.jwt_secret or os.environ.get("JWT_SECRET", "")
            if not signing:
                raise ConfigError("auth: no JWT secret: set plugins.auth.jwt_secret or JWT_SECRET (32+ bytes)")
        else:
            signing = _material(c.jwt_private_key, c.jwt_private_key_file, "jwt_private_key")
            if not signing:
                raise ConfigError(f"auth: {c.jwt_algorithm} needs jwt_private_key or jwt_private_key_file (PEM)")
        others = [(k.kid, k.algorithm, _material(k.key, k.key_file, f"key {k.kid}")) for k in c.jwt_verify_keys]
        try:
            ring = KeyRing(c.jwt_kid, c.jwt_algorithm, signing, others)
        except ValueError as e:
            raise ConfigError(f"auth: bad JWT key configuration: {e}") from None
        return TokenService(ring, issuer=c.issuer, audience=c.audience, access_ttl_s=c.access_ttl_s, leeway_s=c.leeway_s)

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Build the key ring, open the pool (migrating), the Redis client and the KDF threads.

        Raises:
            ConfigError: missing database URL or JWT keys, bad key material.
            Unavailable: the database did not answer within ``db_start_timeout_s``.
        """
        c = self.config
        self.tokens = self._token_service()
        db_url = c.database_url or os.environ.get("DATABASE_URL", "")
        if not db_url:
            raise ConfigError("auth: no database: set plugins.auth.database_url or DATABASE_URL")
        self._hasher = PasswordHasher(time_cost=c.kdf_time_cost, memory_cost=c.kdf_memory_kib, parallelism=c.kdf_parallelism)
        self._kdf = ThreadPoolExecutor(
            max_workers=c.kdf_workers,
            thread_name_prefix="auth-kdf",
            initializer=_lower_thread_priority,
            initargs=(c.kdf_priority,),
        )
        self._gate = KdfGate(c.kdf_workers, c.kdf_max_wait_s)
        self.store = UserStore(
            db_url,
            min_size=c.pool_min,
            max_size=c.pool_max,
            timeout_s=c.pool_timeout_s,
            max_waiting=c.pool_max_waiting,
            connect_timeout_s=c.db_connect_timeout_s,
            outage_retry_s=c.db_retry_s,
        )
        redis_url = c.redis_url or os.environ.get("REDIS_URL", "")
        self.cache = ClaimCache(
            redis_url,
            key_prefix=c.redis_key_prefix,
            timeout_s=c.redis_timeout_s,
            retry_s=c.redis_retry_s,
            max_connections=c.redis_max_connections,
        )
        self.admins = admin_names(list(c.admin_users))
        self.throttle = LoginThrottle(
            self.cache,
            prefix=c.redis_key_prefix,
            user_free=c.login_user_attempts,
            addr_free=c.login_addr_attempts,
            base_s=c.login_backoff_s,
            max_s=c.login_max_backoff_s,
            window_s=c.login_window_s,
        )
        try:
            await self.store.open(c.db_start_timeout_s)
            # A user who does not exist costs a login as much as one who does (no timing oracle).
            # The admission estimate starts from a measurement with every KDF thread busy:
            # argon2 lanes of concurrent hashes share the cores, so one idle hash is too optimistic.
            t0 = time.perf_counter()
            hashes = await asyncio.gather(*(self._run_kdf(self._hasher.hash, os.urandom(16).hex()) for _ in range(c.kdf_workers)))
            self._gate.avg_s = time.perf_counter() - t0
            self._dummy_hash = hashes[0]
            refreshers: list[asyncio.Task[None]] = []
            if redis_url:
                await self.load_cutoffs()
                await self.cache.load_revocations(self.denylist)
                loop = asyncio.get_running_loop()
                refreshers = [loop.create_task(f(c.subject_refresh_s)) for f in (self.refresh_cutoffs, self.refresh_revocations)]
            if not redis_url:
                log.warning("auth: no REDIS_URL: running without the shared revocation list (revocations travel by event only)")
            _plugins.add(self)
            try:
                yield
            finally:
                for t in refreshers:
                    t.cancel()
        finally:
            _plugins.discard(self)
            await self.cache.close()
            await self.store.close()
            self._kdf.shutdown(wait=False, cancel_futures=True)

    def readiness(self) -> str | None:
        """Always None: auth keeps serving without Redis (signatures still verify) and
        without PostgreSQL (Verify/Logout need no database); see :meth:`degraded`."""
        return None

    def degraded(self) -> list[str]:
        """What auth currently runs without (empty when healthy). For ``/ready``'s note."""
        notes = []
        if self.cache is not None and (s := self.cache.status()):
            notes.append(s)
        if self.store is not None and not self.store.breaker.closed:
            notes.append(f"database unavailable ({self.store.breaker.last_error}): register and login fail fast")
        return notes

    # -- helpers --------------------------------------------------------------------

    async def _run_kdf(self, fn: Any, *args: Any) -> Any:
        """Run a hash function on the KDF threads (never on the event loop); time it."""
        assert self._kdf is not None
        gate = self._gate

        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                gate.observe(time.perf_counter() - t0)

        return await asyncio.get_running_loop().run_in_executor(self._kdf, timed)

    def _fail(self, reason: str, exc: Exception) -> Exception:
        FAILURES.labels(reason).inc()
        return exc

    # -- handlers -------------------------------------------------------------------

    # Wide handler limits: the KDF gate, which knows how long hashing takes, answers Overloaded
    # at once; the kernel's queue only caps memory.
    @serves(Register, concurrency=64, max_queue=64, timeout_s=10.0)
    async def register(self, req: Register) -> Registered:
        """Create a user.

        Raises:
            InvalidInput, UserExists, Overloaded, Unavailable.
        """
        assert self.store is not None and self._hasher is not None
        if not USERNAME_RE.fullmatch(req.username):
            raise self._fail("invalid_input", InvalidInput("username must be 3 to 64 characters of A-Z a-z 0-9 _ . @ -"))
        if not _MIN_PASSWORD <= len(req.password) <= _MAX_PASSWORD:
            raise self._fail("invalid_input", InvalidInput(f"password must be {_MIN_PASSWORD} to {_MAX_PASSWORD} characters"))
        if self.store.breaker.blocking:
            # Fail before spending KDF time on a row we could not store.
            raise Unavailable(f"auth: database unavailable ({self.store.breaker.last_error}); retry shortly")
        with self._gate.slot():
            pw_hash = await self._run_kdf(self._hasher.hash, req.password)
        try:
            user_id = await self.store.create_user(req.username, pw_hash, list(self.config.default_scopes))
        except UserExists as e:
            raise self._fail("user_exists", e) from None
        return Registered(user_id=user_id, username=req.username)

    @serves(Login, concurrency=64, max_queue=64, timeout_s=10.0)
    async def login(self, req: Login) -> Token:
        """Check a password and issue an access token.

        Raises:
            InvalidCredentials, Overloaded, Unavailable.
        """
        assert self.store is not None and self._hasher is not None and self.tokens is not None
        assert self.throttle is not None
        if not req.username or len(req.username) > 256:
            raise self._fail("invalid_credentials", InvalidCredentials("wrong username or password"))
        # Refused at once, before the throttle's Redis round trips, when hashing is saturated: in
        # a burst most refused requests are retries, and counting each cost two scripts (PERFORMANCE.md
        # "Fifth pass"). The attempt is not counted then: nothing was checked.
        self._gate.check()
        try:
            await self.throttle.admit(req.username, req.client)  # counts this attempt
        except TooManyAttempts as e:
            raise self._fail("throttled", e) from None
        settled = False  # True once the attempt is known to be a password failure or a success
        try:
            if not _MIN_PASSWORD <= len(req.password) <= _MAX_PASSWORD:
                settled = True
                await self.throttle.failed(req.username, req.client)
                raise self._fail("invalid_credentials", InvalidCredentials("wrong username or password"))
            hasher = self._hasher
            with self._gate.slot():  # saturated meanwhile: refused here (the attempt released below)
                # Dated when the row is read: a disable landing during the hash (any pod) cuts the token off.
                known, read_at = self.subjects.seq, time.time()
                user = await self.store.find_user(req.username)  # the connection is back in the pool here
                stored = user.password_hash if user is not None else self._dummy_hash
                try:
                    await self._run_kdf(hasher.verify, stored, req.password)
                    ok = user is not None
                except (VerifyMismatchError, VerificationError, InvalidHashError):
                    ok = False
            settled = True
            if not ok or user is None or user.disabled:
                await self.throttle.failed(req.username, req.client)
                raise self._fail("invalid_credentials", InvalidCredentials("wrong username or password"))
        finally:
            if not settled:  # overloaded, database down, cancelled: not a password failure
                await self.throttle.release(req.username, req.client)
        if hasher.check_needs_rehash(stored):
            try:
                with self._gate.slot():
                    new_hash = await self._run_kdf(hasher.hash, req.password)
                await self.store.update_hash(user.id, new_hash)
            except (Overloaded, Unavailable) as e:  # the login itself succeeded; upgrade next time
                log.info("auth: password hash upgrade for user %s postponed: %s", user.id, e)
        await self.throttle.succeeded(req.username, req.client)
        cut = self.subjects.before(user.id, known_by=known)  # re-enabled after a disable: date it after the cut-off
        now = max(read_at, cut + 1) if cut is not None else read_at
        token, _claims = self.tokens.issue(user.id, user.username, user.scopes, now=now)
        return Token(access_token=token, token_type="bearer", expires_in=self.config.access_ttl_s)

    @serves(Verify, concurrency=512, max_queue=4096, timeout_s=5.0)
    async def verify(self, req: Verify) -> Claims:
        """Verify a token: header and key, revocation, cached claims or the signature.

        Raises:
            InvalidToken (the message says why).
        """
        return await self._verify(req.token, check_revoked=True)

    async def _verify(self, token: str, *, check_revoked: bool) -> Claims:
        # No I/O on this path (see the module doc): the check itself is cheaper than any cache.
        assert self.tokens is not None
        try:
            claims = self.tokens.verify(token)
        except InvalidToken as e:
            raise self._fail(e.reason, e) from None
        if check_revoked:
            if claims.jti in self.denylist:
                raise self._fail("revoked", InvalidToken("revoked", "revoked: the token was logged out"))
            if self.subjects.denies(claims.sub, claims.iat):
                raise self._fail("revoked", InvalidToken("revoked", "revoked: the user was disabled or deleted"))
        return claims

    async def refresh_revocations(self, every_s: float) -> None:
        """Every ``every_s``, add the revocations Redis got since the last read (until
        cancelled): a pod that missed a ``TokenRevoked`` event catches up within it."""
        assert self.cache is not None
        read_at = time.time()
        while True:
            await asyncio.sleep(every_s)
            now = time.time()
            # The margin covers other pods' clocks running behind ours and the time between a
            # revoking pod's timestamp and its write landing. Redis failures are swallowed.
            if await self.cache.load_revocations(self.denylist, read_at - every_s - 60.0):
                read_at = now

    @serves(Logout, concurrency=64, max_queue=1024, timeout_s=5.0)
    async def logout(self, req: Logout) -> LoggedOut:
        """Revoke a token until its ``exp``: in Redis, in memory here, and in every pod
        through the ``TokenRevoked`` event. Logging out a revoked token again is fine.

        Raises:
            InvalidToken: the token is not one of ours (or already expired).
        """
        assert self.cache is not None
        claims = await self._verify(req.token, check_revoked=False)
        self.denylist.add(claims.jti, claims.exp)
        keep_s = self.config.access_ttl_s + self.config.leeway_s + 1  # the longest a token of ours lives
        if not await self.cache.revoke(claims.jti, claims.exp, keep_s=keep_s):
            log.warning("auth: redis unavailable; revocation of %s held by the TokenRevoked event only", claims.jti)
        await self.kernel.publish(TokenRevoked(jti=claims.jti, exp=claims.exp))
        return LoggedOut(jti=claims.jti)

    # A trivial handler with a deep queue: a burst of logouts must never drop a revocation.
    @serves(TokenRevoked, concurrency=8, max_queue=100_000)
    async def on_revoked(self, ev: TokenRevoked) -> None:
        """Another pod (or this one) revoked a token: deny it here until it expires."""
        self.denylist.add(ev.jti, ev.exp)
