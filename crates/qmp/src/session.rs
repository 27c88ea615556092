//! Per-connection protocol state: capabilities negotiation and the decision
//! what to do with each input value. Pure: no I/O, no runtime.

use serde_json::{Map, Value};

use crate::protocol::{error_response, parse_request, ErrorClass, QmpError, Request};
use crate::writer::qdict_order;
use crate::ParseError;

/// What the dispatcher says about a command name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandInfo {
    /// The command may be run with `exec-oob`.
    pub allow_oob: bool,
}

/// What to do with one input value.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this message; nothing to run.
    Reply(Value),
    /// Run this command and reply with its outcome.
    Dispatch(Request),
}

/// Negotiation state of one monitor connection.
#[derive(Debug, Clone, Default)]
pub struct Session {
    negotiated: bool,
    oob: bool,
}

const CAPABILITIES: &str = "qmp_capabilities";

impl Session {
    /// A session in capabilities-negotiation mode.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `qmp_capabilities` has succeeded (events flow from then on).
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Whether the `oob` capability was enabled.
    pub fn oob_enabled(&self) -> bool {
        self.oob
    }

    /// Decide what to do with one item from the [`crate::JsonStreamer`].
    ///
    /// `lookup` tells whether a command exists (`None`: unknown) and whether
    /// it may run out of band. It is only asked after negotiation.
    pub fn handle(
        &mut self,
        item: Result<Value, ParseError>,
        lookup: impl Fn(&str) -> Option<CommandInfo>,
    ) -> Action {
        let value = match item {
            Ok(v) => v,
            Err(e) => {
                return Action::Reply(error_response(&QmpError::generic(e.desc()), None));
            }
        };
        let req = match parse_request(value, self.oob) {
            Ok(r) => r,
            Err(e) => return Action::Reply(e.response()),
        };
        if req.command == CAPABILITIES {
            let result = self.capabilities(&req);
            return Action::Reply(crate::protocol::response(result, req.id));
        }
        if !self.negotiated {
            let err = QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return Action::Reply(error_response(&err, req.id));
        }
        let Some(info) = lookup(&req.command) else {
            let err = QmpError::command_not_found(&req.command);
            return Action::Reply(error_response(&err, req.id));
        };
        if req.oob && !info.allow_oob {
            let err =
                QmpError::generic(format!("The command {} does not support OOB", req.command));
            return Action::Reply(error_response(&err, req.id));
        }
        Action::Dispatch(req)
    }

    /// `qmp_capabilities`: arguments are checked first, as qemu's
    /// marshaller does, then the negotiation state.
    fn capabilities(&mut self, req: &Request) -> Result<Value, QmpError> {
        if req.oob {
            return Err(QmpError::generic(format!(
                "The command {CAPABILITIES} does not support OOB"
            )));
        }
        let oob = parse_capabilities_args(&req.arguments)?;
        if self.negotiated {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        self.negotiated = true;
        self.oob = oob;
        Ok(Value::Object(Map::new()))
    }
}

/// Validate `{"enable": ["oob", ...]}`; returns whether oob is requested.
fn parse_capabilities_args(args: &Map<String, Value>) -> Result<bool, QmpError> {
    let mut oob = false;
    if let Some(enable) = args.get("enable") {
        let Value::Array(list) = enable else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        for (i, cap) in list.iter().enumerate() {
            match cap {
                Value::String(s) if s == "oob" => oob = true,
                // qemu's enum visitor names the member 'null' here.
                Value::String(s) => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'null' does not accept value '{s}'"
                    )))
                }
                _ => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for 'enable[{i}]', expected: string"
                    )))
                }
            }
        }
    }
    // qemu reports the first leftover of a glib hash table; qdict order is
    // an approximation that agrees when there is only one.
    let unexpected = qdict_order(args).into_iter().map(|(k, _)| k);
    if let Some(key) = unexpected.into_iter().find(|k| k.as_str() != "enable") {
        return Err(QmpError::generic(format!(
            "Parameter '{key}' is unexpected"
        )));
    }
    Ok(oob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::to_json;
    use serde_json::json;

    fn run(s: &mut Session, v: Value) -> String {
        match s.handle(Ok(v), |name| {
            (name != "nosuch").then_some(CommandInfo::default())
        }) {
            Action::Reply(r) => to_json(&r, false),
            Action::Dispatch(req) => format!("dispatch {} oob={}", req.command, req.oob),
        }
    }

    #[test]
    fn test_session_before_negotiation_refuses_commands() {
        let mut s = Session::new();
        assert_eq!(
            run(&mut s, json!({"execute": "query-version", "id": 1})),
            r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
        );
        assert!(!s.is_negotiated());
    }

    #[test]
    fn test_session_negotiation_then_dispatch_and_second_negotiation_refused() {
        let mut s = Session::new();
        let r = run(
            &mut s,
            json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "a"}),
        );
        assert_eq!(r, r#"{"return": {}, "id": "a"}"#);
        assert!(s.is_negotiated() && s.oob_enabled());
        assert_eq!(
            run(&mut s, json!({"execute": "query-version"})),
            "dispatch query-version oob=false"
        );
        assert_eq!(
            run(&mut s, json!({"execute": "qmp_capabilities"})),
            r#"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#
        );
        assert_eq!(
            run(&mut s, json!({"exec-oob": "query-version", "id": "x"})),
            r#"{"id": "x", "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}}"#
        );
        assert_eq!(
            run(&mut s, json!({"exec-oob": "nosuch", "id": "x"})),
            r#"{"id": "x", "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}"#
        );
    }

    #[test]
    fn test_session_capabilities_argument_errors_match_qemu() {
        let cases = [
            (
                json!({"enable": "oob"}),
                "Invalid parameter type for 'enable', expected: array",
            ),
            (
                json!({"enable": null}),
                "Invalid parameter type for 'enable', expected: array",
            ),
            (
                json!({"enable": [1]}),
                "Invalid parameter type for 'enable[0]', expected: string",
            ),
            (
                json!({"enable": ["foo"]}),
                "Parameter 'null' does not accept value 'foo'",
            ),
            (json!({"foo": 1}), "Parameter 'foo' is unexpected"),
        ];
        for (args, want) in cases {
            let mut s = Session::new();
            let r = run(
                &mut s,
                json!({"execute": "qmp_capabilities", "arguments": args}),
            );
            assert!(r.contains(want), "{r}");
            assert!(!s.is_negotiated());
        }
    }

    #[test]
    fn test_session_parse_error_replies_without_id() {
        let mut s = Session::new();
        let err = ParseError::new("JSON parse error, expecting value".into());
        let Action::Reply(r) = s.handle(Err(err), |_| None) else {
            panic!("expected a reply");
        };
        assert_eq!(
            to_json(&r, false),
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#
        );
    }
}
