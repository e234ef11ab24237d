//! The machine state machine of spec/platform.md §18: which operation each state allows.
//! Persistent states that do not allow an operation refuse it with 412 (precondition
//! failed); transient states mean another operation is under way and refuse with 409.

use aloft_api::MachineState;
use http::StatusCode;

use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Start,
    Stop,
    Suspend,
    Restart,
    Signal,
    Update,
    Destroy {
        force: bool,
    },
    /// exec and ps: need a running machine.
    Inspect,
    /// cordon, uncordon, metadata, leases: anything but a destroyed machine.
    Annotate,
}

impl Operation {
    fn verb(self) -> &'static str {
        match self {
            Operation::Start => "start",
            Operation::Stop => "stop",
            Operation::Suspend => "suspend",
            Operation::Restart => "restart",
            Operation::Signal => "signal",
            Operation::Update => "update",
            Operation::Destroy { .. } => "destroy",
            Operation::Inspect => "inspect",
            Operation::Annotate => "change",
        }
    }
}

/// What an allowed operation does from the current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Go through `transient` and ask the host.
    Proceed { transient: MachineState },
    /// Nothing to do: the machine is already where the operation leads.
    AlreadyDone,
}

pub fn is_transient(state: MachineState) -> bool {
    matches!(
        state,
        MachineState::Starting
            | MachineState::Stopping
            | MachineState::Suspending
            | MachineState::Replacing
            | MachineState::Destroying
    )
}

/// Decides whether `operation` may run on a machine in `state`.
pub fn plan(operation: Operation, state: MachineState) -> Result<Plan, ApiError> {
    use MachineState as S;
    let refuse = || -> ApiError {
        let message = match (operation, state) {
            (Operation::Destroy { force: false }, S::Started | S::Starting) => {
                "unable to destroy machine, not currently stopped: stop it first or pass force=true"
                    .to_string()
            }
            (_, S::Destroyed) => format!("unable to {} machine: it is destroyed", operation.verb()),
            (_, state) if is_transient(state) => format!(
                "unable to {} machine while it is {state}: another operation is in progress; wait for it to settle",
                operation.verb()
            ),
            (Operation::Start, state) => {
                format!("unable to start machine from current state: '{state}'")
            }
            (_, state) => format!(
                "unable to {} machine from current state: '{state}'",
                operation.verb()
            ),
        };
        let status = if is_transient(state) {
            StatusCode::CONFLICT
        } else {
            StatusCode::PRECONDITION_FAILED
        };
        ApiError::new(status, message)
    };
    let proceed = |transient| Ok(Plan::Proceed { transient });
    match operation {
        Operation::Start => match state {
            S::Created | S::Stopped | S::Suspended | S::Failed => proceed(S::Starting),
            _ => Err(refuse()),
        },
        Operation::Stop => match state {
            S::Started | S::Suspended | S::Failed => proceed(S::Stopping),
            S::Stopped | S::Created => Ok(Plan::AlreadyDone),
            _ => Err(refuse()),
        },
        Operation::Suspend => match state {
            S::Started => proceed(S::Suspending),
            S::Suspended => Ok(Plan::AlreadyDone),
            _ => Err(refuse()),
        },
        Operation::Restart => match state {
            S::Started => proceed(S::Stopping),
            _ => Err(refuse()),
        },
        Operation::Signal | Operation::Inspect => match state {
            S::Started => proceed(S::Started),
            _ => Err(refuse()),
        },
        Operation::Update => match state {
            S::Created | S::Started | S::Stopped | S::Suspended | S::Failed => {
                proceed(S::Replacing)
            }
            _ => Err(refuse()),
        },
        Operation::Destroy { force } => match state {
            S::Created | S::Stopped | S::Suspended | S::Failed => proceed(S::Destroying),
            S::Started if force => proceed(S::Destroying),
            // A machine stuck in a transient state can still be destroyed by force.
            S::Starting | S::Stopping | S::Suspending | S::Replacing if force => {
                proceed(S::Destroying)
            }
            _ => Err(refuse()),
        },
        Operation::Annotate => match state {
            S::Destroyed | S::Destroying => Err(refuse()),
            _ => proceed(state),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_and_operation_has_an_answer() {
        let operations = [
            Operation::Start,
            Operation::Stop,
            Operation::Suspend,
            Operation::Restart,
            Operation::Signal,
            Operation::Update,
            Operation::Destroy { force: false },
            Operation::Destroy { force: true },
            Operation::Inspect,
            Operation::Annotate,
        ];
        for state in MachineState::ALL {
            for operation in operations {
                match plan(operation, state) {
                    Ok(_) => {}
                    Err(err) => {
                        assert!(
                            matches!(
                                err.status,
                                StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED
                            ),
                            "{operation:?} from {state}: {err:?}"
                        );
                        assert!(err.message.contains("unable to"), "{}", err.message);
                    }
                }
            }
        }
    }

    #[test]
    fn lifecycle_follows_the_spec() {
        use MachineState as S;
        assert_eq!(
            plan(Operation::Start, S::Stopped).unwrap(),
            Plan::Proceed {
                transient: S::Starting
            }
        );
        assert_eq!(
            plan(Operation::Start, S::Suspended).unwrap(),
            Plan::Proceed {
                transient: S::Starting
            }
        );
        assert_eq!(
            plan(Operation::Start, S::Started).unwrap_err().status,
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(
            plan(Operation::Start, S::Stopping).unwrap_err().status,
            StatusCode::CONFLICT
        );
        assert_eq!(
            plan(Operation::Stop, S::Stopped).unwrap(),
            Plan::AlreadyDone
        );
        assert_eq!(
            plan(Operation::Stop, S::Suspended).unwrap(),
            Plan::Proceed {
                transient: S::Stopping
            },
            "stopping a suspended machine discards its snapshot"
        );
        assert_eq!(
            plan(Operation::Suspend, S::Started).unwrap(),
            Plan::Proceed {
                transient: S::Suspending
            }
        );
        assert_eq!(
            plan(Operation::Suspend, S::Stopped).unwrap_err().status,
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(
            plan(Operation::Update, S::Started).unwrap(),
            Plan::Proceed {
                transient: S::Replacing
            }
        );
        assert_eq!(
            plan(Operation::Update, S::Replacing).unwrap_err().status,
            StatusCode::CONFLICT
        );
        assert_eq!(
            plan(Operation::Update, S::Destroyed).unwrap_err().status,
            StatusCode::PRECONDITION_FAILED
        );
        let err = plan(Operation::Destroy { force: false }, S::Started).unwrap_err();
        assert_eq!(err.status, StatusCode::PRECONDITION_FAILED);
        assert!(err.message.contains("force=true"));
        assert_eq!(
            plan(Operation::Destroy { force: true }, S::Started).unwrap(),
            Plan::Proceed {
                transient: S::Destroying
            }
        );
        assert_eq!(
            plan(Operation::Destroy { force: true }, S::Destroyed)
                .unwrap_err()
                .status,
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(
            plan(Operation::Signal, S::Stopped).unwrap_err().status,
            StatusCode::PRECONDITION_FAILED
        );
        assert!(plan(Operation::Annotate, S::Stopped).is_ok());
        assert!(plan(Operation::Annotate, S::Destroyed).is_err());
    }
}
