"""A real, throw-away PostgreSQL server for tests: initdb into a temporary directory, pg_ctl start on a free
localhost port, pg_ctl stop -m immediate at the end. The fixtures (tests/service/conftest.py) skip cleanly when
PostgreSQL or psycopg is missing.

initdb and postgres refuse to run as root; as root (CI in a container) the server runs as Debian's ``postgres``
user (``runuser -u postgres --``, else ``su postgres -c``) in a directory under /tmp that the user owns.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

from . import free_port

COMMAND_TIMEOUT = 60  # seconds for every initdb / pg_ctl call (pg_ctl start waits up to START_WAIT itself)
START_WAIT = 60
SUPERUSER = "facesiam"
RUN_AS = "postgres"  # the unprivileged user Debian's postgresql package creates, for when the tests run as root
INSTALL_HINT = "install Debian's postgresql package (see .ci/run)"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, including ".s.PGSQL.<port>"


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be started here; str(exc) is a one-line reason for pytest.skip."""


def _one_line(text: str, limit: int = 300) -> str:
    """The most telling line of a command's output: the last error line, else the last line."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|fatal|could not|invalid|denied", line, re.I)]
    return ((errors or lines)[-1] if lines else "(no output)")[:limit]


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl"))


def find_bindir() -> Optional[Path]:
    """The directory holding initdb and pg_ctl: ``pg_config --bindir``, else the highest
    /usr/lib/postgresql/*/bin, else wherever ``initdb`` is on PATH; None when there is none."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            # libpq-dev's pg_config may point at a bindir without the server: check, then fall through.
            if out.returncode == 0 and out.stdout.strip() and _has_server_binaries(Path(out.stdout.strip())):
                return Path(out.stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", Path(path).parent.name))

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if _has_server_binaries(Path(bindir)):
            return Path(bindir)
    initdb = shutil.which("initdb")
    if initdb:
        for bindir in (Path(initdb).parent, Path(initdb).resolve().parent):
            if _has_server_binaries(bindir):
                return bindir
    return None


class PostgresServer:
    """A running server: ``url(dbname)``, ``create_database()``, ``stop()``, ``log_tail()``; ``pause()`` and
    ``resume()`` take it down and bring it back on the same port (a database restart under a running service)."""

    def __init__(self, bindir: Path, workdir: Path, run_as: Optional[list[str]], *, remove_workdir: bool):
        self.bindir = bindir
        self.workdir = workdir
        self.data = workdir / "data"
        self.log = workdir / "postgres.log"
        self.run_as = run_as  # argv prefix (runuser/su) when we are root, else None
        self.remove_workdir = remove_workdir
        self.user = SUPERUSER
        self.port = 0
        self.socket_dir = self.data
        self._extra_dirs: list[Path] = []

    # ---------------------------------------------------------------------------------------------- commands
    def _run(self, argv: list[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        if self.run_as is not None:
            if self.run_as[-1] == "-c":
                argv = [*self.run_as, shlex.join(argv)]  # su postgres -s /bin/sh -c "<command>"
            else:
                argv = [*self.run_as, *argv]
        env = {**os.environ, "LC_ALL": "C"}
        for var in ("PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE"):
            env.pop(var, None)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.workdir, env=env,
                              stdin=subprocess.DEVNULL)

    def initdb(self) -> None:
        out = self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", SUPERUSER,
                         "--no-sync", "-E", "UTF8", "--locale=C"])
        if out.returncode != 0:
            raise PostgresUnavailable(f"initdb failed (exit {out.returncode}): {_one_line(out.stderr or out.stdout)}")

    def start(self, attempts: int = 3, port: Optional[int] = None) -> None:
        if len(str(self.data)) + len("/.s.PGSQL.65535") > SOCKET_PATH_MAX:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-", dir="/tmp"))
            self._extra_dirs.append(self.socket_dir)
        reason = ""
        for _ in range(attempts):  # the free port can be taken between free_port() and the bind: try another
            self.port = port or free_port()
            options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                       f"-c unix_socket_directories={shlex.quote(str(self.socket_dir))} -c fsync=off")
            try:
                out = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-w",
                                 "-t", str(START_WAIT), "-l", str(self.log), "start"], timeout=START_WAIT + 30)
            except subprocess.TimeoutExpired:
                raise PostgresUnavailable(f"pg_ctl start did not return within {START_WAIT + 30}s")
            if out.returncode == 0:
                return
            reason = f"pg_ctl start failed (exit {out.returncode}): {_one_line(self.log_tail() or out.stderr)}"
            if port or ("could not bind" not in self.log_tail() and "already in use" not in self.log_tail()):
                break
        raise PostgresUnavailable(reason)

    def pause(self) -> None:
        """pg_ctl stop -m fast: the server goes away (clients are disconnected), its data stays."""
        out = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t",
                         str(COMMAND_TIMEOUT), "stop"], timeout=COMMAND_TIMEOUT + 10)
        if out.returncode != 0:
            raise PostgresUnavailable(f"pg_ctl stop failed: {_one_line(out.stderr or out.stdout)}")

    def resume(self) -> None:
        """Start the paused server again on the same port."""
        self.start(attempts=1, port=self.port)

    def stop(self) -> None:
        """pg_ctl stop -m immediate (kill -9 the postmaster if that fails), then remove our directories."""
        if (self.data / "postmaster.pid").exists():
            try:
                out = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                                 "-t", str(COMMAND_TIMEOUT), "stop"], timeout=COMMAND_TIMEOUT + 10)
                stopped = out.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                stopped = False
            if not stopped:
                self._kill_postmaster()
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        for path in self._extra_dirs:
            shutil.rmtree(path, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)  # root may; as the owner we may too
            time.sleep(0.5)
        except (OSError, ValueError, IndexError):
            pass

    # ---------------------------------------------------------------------------------------------- helpers
    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: Optional[str] = None) -> str:
        """CREATE DATABASE (a unique name unless given) and return its URL."""
        return create_database(self.url(), name)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def create_database(server_url: str, name: Optional[str] = None) -> str:
    """CREATE DATABASE on the server behind ``server_url`` (any database on it); returns the new database's URL."""
    import psycopg
    from psycopg import sql

    name = name or f"facesiam_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop_database(server_url: str, name: str) -> None:
    """DROP DATABASE ... WITH (FORCE), best effort (a test's leftover connections are cut)."""
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    except psycopg.Error:
        pass


def _run_as_prefix() -> list[str]:
    """argv prefix that runs a command as RUN_AS (we are root)."""
    import pwd

    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        raise PostgresUnavailable(f"running as root and there is no '{RUN_AS}' user to run initdb as")
    runuser = shutil.which("runuser") or next((p for p in ("/usr/sbin/runuser", "/sbin/runuser")
                                               if os.access(p, os.X_OK)), None)
    if runuser:
        return [runuser, "-u", RUN_AS, "--"]
    su = shutil.which("su")
    if su:
        return [su, RUN_AS, "-s", "/bin/sh", "-c"]
    raise PostgresUnavailable(f"running as root and neither runuser nor su is available to become '{RUN_AS}'")


def start_postgres(tmp_dir: Path) -> PostgresServer:
    """initdb + pg_ctl start; the caller must ``stop()`` the returned server. Raises PostgresUnavailable (a one-line
    reason) when there are no binaries, no way to drop root, or initdb / start fails.

    Not root: the cluster lives in ``tmp_dir/data`` (left for pytest to clean, with ``tmp_dir/postgres.log``).
    Root: in a fresh ``/tmp/facesiam-pg-*`` directory (0755, owned by RUN_AS; data 0700), removed by ``stop()``.
    """
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable("initdb/pg_ctl not found (pg_config --bindir, /usr/lib/postgresql/*/bin, PATH)")
    if os.geteuid() == 0:
        import pwd

        run_as = _run_as_prefix()
        entry = pwd.getpwnam(RUN_AS)
        workdir = Path(tempfile.mkdtemp(prefix="facesiam-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
        os.chmod(workdir, 0o755)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
        server = PostgresServer(bindir, workdir, run_as, remove_workdir=True)
        server.data.mkdir(mode=0o700)
        os.chown(server.data, entry.pw_uid, entry.pw_gid)
    else:
        workdir = Path(tmp_dir)
        workdir.mkdir(parents=True, exist_ok=True)
        server = PostgresServer(bindir, workdir, None, remove_workdir=False)
        server.data.mkdir(mode=0o700)
    try:
        server.initdb()
        server.start()
    except PostgresUnavailable:
        server.stop()
        raise
    except (OSError, subprocess.TimeoutExpired) as exc:
        server.stop()
        raise PostgresUnavailable(f"{type(exc).__name__}: {_one_line(str(exc))}") from exc
    return server
