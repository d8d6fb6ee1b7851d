"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s typecheck`, `nox -s benchmarks`."""

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
# Install the CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs, env={"OMP_NUM_THREADS": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "lightning_debug", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "lightning_debug", "tests", "examples", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("mypy", "lightning_debug")


@nox.session
def benchmarks(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/run.py", *session.posargs)
