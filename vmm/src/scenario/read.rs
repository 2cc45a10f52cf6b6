//! Reading typed steps from TOML tables: `do` selects the [`Action`]
//! variant, the other keys must be exactly its fields, and every refusal
//! carries the byte span of the field at fault (the file module turns it
//! into `line:column`).

use std::ops::Range;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::expect::{Expect, Outcome};
use super::step::{Action, Guest, Step, StepError, KINDS};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestOpts {
    #[serde(default)]
    vcpu: u64,
    #[serde(default = "one")]
    repeat: u64,
    #[serde(default, rename = "async")]
    is_async: bool,
}

fn one() -> u64 {
    1
}

impl Step {
    /// Reads one step written as a TOML table's body (`do = "plug"` ...).
    pub fn parse_toml(text: &str) -> Result<Step, StepError> {
        let table = DeTable::parse(text).map_err(|e| StepError {
            field: None,
            span: e.span(),
            problem: e.message().to_string(),
        })?;
        let span = table.span();
        Step::from_table(table.get_ref(), span)
    }

    /// Reads a step from a parsed TOML table whose text spans `span`.
    pub fn from_table(table: &DeTable<'_>, span: Range<usize>) -> Result<Step, StepError> {
        let at = |key: &str| {
            table
                .iter()
                .find(|(k, _)| k.get_ref() == key)
                .map(|(k, v)| (k.span(), v))
        };
        let kind = match at("do") {
            None => {
                return Err(StepError {
                    field: Some("do".into()),
                    span: Some(span),
                    problem: "every step needs `do` (the step kind)".into(),
                })
            }
            Some((_, v)) => match v.get_ref().as_str() {
                Some(s) => (s.to_string(), v.span()),
                None => return Err(field_error("do", v.span(), "must be a string")),
            },
        };
        let (expect, expect_span) = match at("expect") {
            None => (Expect::default(), span.clone()),
            Some((_, v)) => {
                let s = v
                    .get_ref()
                    .as_str()
                    .ok_or_else(|| field_error("expect", v.span(), "must be a string"))?;
                let e = s
                    .parse()
                    .map_err(|e: super::expect::ExpectError| field_error("expect", v.span(), e))?;
                (e, v.span())
            }
        };
        let note = match at("note") {
            None => None,
            Some((_, v)) => Some(
                v.get_ref()
                    .as_str()
                    .ok_or_else(|| field_error("note", v.span(), "must be a string"))?
                    .to_string(),
            ),
        };
        let rest: DeTable<'_> = table
            .iter()
            .filter(|(k, _)| !matches!(k.get_ref().as_ref(), "do" | "expect" | "note"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let action = Action::from_fields(&kind.0, kind.1, rest, span.clone())?;
        let step = Step {
            action,
            expect,
            note,
        };
        step.action.check().map_err(|mut e| {
            e.span = e
                .field
                .as_deref()
                .and_then(at)
                .map(|(k, _)| k)
                .or(Some(span));
            e
        })?;
        if let Expect::AnyOf(list) = &step.expect {
            if let Some(o) = list.iter().find(|o| !step.action.can_end_with(**o)) {
                let can: Vec<&str> = Outcome::ALL
                    .iter()
                    .filter(|o| step.action.can_end_with(**o))
                    .map(|o| o.name())
                    .collect();
                return Err(field_error(
                    "expect",
                    expect_span,
                    format!(
                        "a `{}` step never ends with `{o}`; it can end with {} (or \"error\": any but ok)",
                        step.kind(),
                        can.join(", ")
                    ),
                ));
            }
        }
        Ok(step)
    }
}

fn field_error(field: &str, span: Range<usize>, problem: impl ToString) -> StepError {
    StepError {
        field: Some(field.into()),
        span: Some(span),
        problem: problem.to_string(),
    }
}

/// Deserializes `T` from `table`, naming the field of any error by its span.
fn typed<T: DeserializeOwned>(table: DeTable<'_>, span: Range<usize>) -> Result<T, StepError> {
    let keys: Vec<(String, Range<usize>, Range<usize>)> = table
        .iter()
        .map(|(k, v)| (k.get_ref().to_string(), k.span(), v.span()))
        .collect();
    T::deserialize(ValueDeserializer::from(Spanned::new(
        span.clone(),
        DeValue::Table(table),
    )))
    .map_err(|e| {
        let message = e.message().to_string();
        let err = e.span().unwrap_or(span.clone());
        let field = keys
            .iter()
            .find(|(_, k, v)| k.contains(&err.start) || v.contains(&err.start))
            .map(|(name, _, _)| name.clone())
            .or_else(|| {
                // "missing field `size`": the field is named, not present.
                let (_, tail) = message.split_once('`')?;
                Some(tail.split_once('`')?.0.to_string())
            });
        let problem = if message.starts_with("unknown field") {
            let (head, tail) = message
                .split_once(", expected ")
                .unwrap_or((message.split(',').next().unwrap_or_default(), ""));
            let mut fields: Vec<&str> = tail
                .trim_start_matches("one of ")
                .split([',', ' '])
                .filter(|w| w.starts_with('`'))
                .collect();
            fields.extend(["`expect`", "`note`"]);
            format!(
                "{head}: not a field of this step kind (its fields: {})",
                fields.join(", ")
            )
        } else if message.starts_with("missing field") {
            message.replacen("missing field", "needs", 1)
        } else {
            message
        };
        StepError {
            field,
            span: Some(err),
            problem,
        }
    })
}

/// Splits the guest fields off `table` and reads the command from the rest.
fn guest<C: DeserializeOwned>(
    mut table: DeTable<'_>,
    span: Range<usize>,
) -> Result<Guest<C>, StepError> {
    let mut opts = DeTable::new();
    for key in ["vcpu", "repeat", "async"] {
        if let Some((k, v)) = table.remove_entry(key) {
            opts.insert(k, v);
        }
    }
    let o: GuestOpts = typed(opts, span.clone())?;
    Ok(Guest {
        vcpu: o.vcpu,
        repeat: o.repeat,
        is_async: o.is_async,
        command: typed(table, span).map_err(|mut e: StepError| {
            e.problem = e.problem.replace(
                "`expect`, `note`)",
                "`vcpu`, `repeat`, `async`, `expect`, `note`)",
            );
            e
        })?,
    })
}

impl Action {
    fn from_fields(
        kind: &str,
        kind_span: Range<usize>,
        t: DeTable<'_>,
        s: Range<usize>,
    ) -> Result<Action, StepError> {
        Ok(match kind {
            "plug" => Action::Plug(typed(t, s)?),
            "unplug" => Action::Unplug(typed(t, s)?),
            "protect" => Action::Protect(typed(t, s)?),
            "move" => Action::Move(typed(t, s)?),
            "resize" => Action::Resize(typed(t, s)?),
            "dirty-log" => Action::DirtyLog(typed(t, s)?),
            "dirty-pages" => Action::DirtyPages(typed(t, s)?),
            "stage2-dump" => Action::Stage2Dump(typed(t, s)?),
            "plug-many" => Action::PlugMany(typed(t, s)?),
            "check" => Action::Check(typed(t, s)?),
            "pin" => Action::Pin(typed(t, s)?),
            "unpin" => Action::Unpin(typed(t, s)?),
            "fill" => Action::Fill(guest(t, s)?),
            "verify" => Action::Verify(guest(t, s)?),
            "verify-const" => Action::VerifyConst(guest(t, s)?),
            "touch" => Action::Touch(guest(t, s)?),
            "read" => Action::Read(guest(t, s)?),
            "write" => Action::Write(guest(t, s)?),
            "spin" => Action::Spin(guest(t, s)?),
            "dma-copy" => Action::DmaCopy(guest(t, s)?),
            "dma-fill" => Action::DmaFill(guest(t, s)?),
            "dma-checksum" => Action::DmaChecksum(guest(t, s)?),
            "wait" => Action::Wait(typed(t, s)?),
            "sleep" => Action::Sleep(typed(t, s)?),
            other => {
                return Err(field_error(
                    "do",
                    kind_span,
                    format!(
                        "unknown step kind {other:?}; expected one of {}",
                        KINDS.join(", ")
                    ),
                ))
            }
        })
    }
}
