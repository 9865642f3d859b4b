"""kira: run a graph of interdependent tasks concurrently, with retries and rollback.

Define each step as a `Branch` (what it does, what it needs, how to undo it),
then run them with `run_tasks` (threads) or `run_tasks_async` (asyncio). When a
step fails for good, every applied step is unapplied in reverse dependency order
and `RolledBack` is raised. `RuntimeState` is the pure state machine underneath.
"""

from ._asyncio import run_tasks_async
from ._branch import Branch, Decision, RetryAfter, retry_policy
from ._engine import AttemptInfo, current_attempt
from ._errors import (
    BranchError,
    BranchTimeout,
    CycleError,
    DuplicateBranchError,
    GraphError,
    KiraError,
    MissingDependencyError,
    RollbackIncomplete,
    RolledBack,
    RunFailed,
    RuntimeStateError,
)
from ._events import Event
from ._journal import (
    Codec,
    CodecError,
    Journal,
    JournalError,
    JSONCodec,
    RestoredError,
    RunLocked,
    RunSummary,
)
from ._resume import ResumeMismatchError, resume
from ._state import (
    BranchState,
    DoneApplied,
    DoneUnapplied,
    Failed,
    NotStarted,
    Progress,
    RunningApply,
    RunningApplyRetry,
    RunningUnapply,
    RunningUnapplyRetry,
    RuntimeState,
    TaskState,
    UnapplyFailed,
)
from ._threads import run_tasks

__version__ = "0.1.0"

__all__ = [
    "AttemptInfo",
    "Branch",
    "BranchError",
    "BranchState",
    "BranchTimeout",
    "Codec",
    "CodecError",
    "CycleError",
    "Decision",
    "DoneApplied",
    "DoneUnapplied",
    "DuplicateBranchError",
    "Event",
    "Failed",
    "GraphError",
    "JSONCodec",
    "Journal",
    "JournalError",
    "KiraError",
    "MissingDependencyError",
    "NotStarted",
    "Progress",
    "RestoredError",
    "ResumeMismatchError",
    "RetryAfter",
    "RollbackIncomplete",
    "RolledBack",
    "RunFailed",
    "RunLocked",
    "RunSummary",
    "RunningApply",
    "RunningApplyRetry",
    "RunningUnapply",
    "RunningUnapplyRetry",
    "RuntimeState",
    "RuntimeStateError",
    "TaskState",
    "UnapplyFailed",
    "__version__",
    "current_attempt",
    "resume",
    "retry_policy",
    "run_tasks",
    "run_tasks_async",
]
