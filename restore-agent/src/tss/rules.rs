//! Which manifest components go into a ticket request, and with which flags (§4.5, §4.7).

use plist::{Dictionary, Value};

use super::TssParams;

/// Never part of an AP ticket request.
pub const AP_SKIPPED: &[&str] = &[
    "BasebandFirmware",
    "SE,UpdatePayload",
    "BaseSystem",
    "Diags",
    "Ap,ExclaveOS",
];

/// Additionally left out of the recoveryOS root ticket: boot-chain and restore-only pieces.
pub const RECOVERY_SKIPPED: &[&str] = &[
    "ANS",
    "Ap,AudioBootChime",
    "Ap,CIO",
    "Ap,RestoreCIO",
    "Ap,RestoreTMU",
    "Ap,TMU",
    "Ap,rOSLogo1",
    "Ap,rOSLogo2",
    "AppleLogo",
    "DCP",
    "LLB",
    "RecoveryMode",
    "RestoreANS",
    "RestoreDCP",
    "RestoreDeviceTree",
    "RestoreKernelCache",
    "RestoreLogo",
    "RestoreRamDisk",
    "RestoreSEP",
    "SEP",
    "ftap",
    "ftsp",
    "iBEC",
    "iBSS",
    "rfta",
    "rfts",
];

/// The parameter a rule condition refers to, or `None` for a condition we cannot evaluate
/// (which makes the rule not apply, like the reference tools).
fn condition_value(key: &str, params: &TssParams) -> Option<Value> {
    match key {
        "ApRawProductionMode" | "ApCurrentProductionMode" => {
            Some(Value::Boolean(params.production_mode))
        }
        "ApRawSecurityMode" => Some(Value::Boolean(params.security_mode)),
        "ApRequiresImage4" => Some(Value::Boolean(params.supports_img4)),
        "ApDemotionPolicyOverride" => params.demotion_policy.clone().map(Value::String),
        "ApInRomDFU" => params.in_rom_dfu.map(Value::Boolean),
        _ => None,
    }
}

/// Whether every condition of a rule holds for `params`.
pub fn conditions_hold(conditions: &Dictionary, params: &TssParams) -> bool {
    conditions
        .iter()
        .all(|(key, want)| condition_value(key, params).as_ref() == Some(want))
}

/// The request parameter a rule condition reads (libtatsu's mapping), or `None` for a
/// condition nobody evaluates.
pub fn condition_parameter(condition: &str) -> Option<&'static str> {
    Some(match condition {
        "ApRawProductionMode" | "ApCurrentProductionMode" => "ApProductionMode",
        "ApRawSecurityMode" => "ApSecurityMode",
        "ApRequiresImage4" => "ApSupportsImg4",
        "ApDemotionPolicyOverride" => "DemotionPolicy",
        "ApInRomDFU" => "ApInRomDFU",
        _ => return None,
    })
}

/// Apply `Info.RestoreRequestRules` to a request entry: every rule whose conditions all hold
/// sets its boolean actions (later rules override earlier ones).
pub fn apply_restore_request_rules(entry: &mut Dictionary, rules: &[Value], params: &TssParams) {
    apply_rules_with(entry, rules, |key| condition_value(key, params));
}

/// [`apply_restore_request_rules`] for requests whose parameters are a dictionary (the
/// firmware-updater requests of §4.9): a condition holds when the parameter it maps to is
/// present and equal; a missing parameter makes the rule not apply.
pub fn apply_restore_request_rules_from(
    entry: &mut Dictionary,
    rules: &[Value],
    params: &Dictionary,
) {
    apply_rules_with(entry, rules, |key| {
        condition_parameter(key).and_then(|p| params.get(p).cloned())
    });
}

fn apply_rules_with(
    entry: &mut Dictionary,
    rules: &[Value],
    value_of: impl Fn(&str) -> Option<Value>,
) {
    for rule in rules.iter().filter_map(Value::as_dictionary) {
        let empty = Dictionary::new();
        let conditions = rule
            .get("Conditions")
            .and_then(Value::as_dictionary)
            .unwrap_or(&empty);
        if !conditions
            .iter()
            .all(|(key, want)| value_of(key).as_ref() == Some(want))
        {
            continue;
        }
        let Some(actions) = rule.get("Actions").and_then(Value::as_dictionary) else {
            continue;
        };
        for (key, value) in actions {
            if let Value::Boolean(b) = value {
                remove_keeping_order(entry, key);
                entry.insert(key.clone(), Value::Boolean(*b));
            }
        }
    }
}

/// `Dictionary::remove` swaps the last key into the hole; requests keep the manifest's key
/// order (like the reference tools) so they stay comparable with captured ones.
pub(super) fn remove_keeping_order(dict: &mut Dictionary, key: &str) {
    dict.retain(|k, _| k != key);
}

fn info(entry: &Dictionary) -> Option<&Dictionary> {
    entry.get("Info").and_then(Value::as_dictionary)
}

pub(super) fn rules(entry: &Dictionary) -> Option<&Vec<Value>> {
    info(entry)?
        .get("RestoreRequestRules")
        .and_then(Value::as_array)
}

pub(super) fn is_true(dict: &Dictionary, key: &str) -> bool {
    matches!(dict.get(key), Some(Value::Boolean(true)))
}

/// Copy an entry without `Info`, apply its rules, and make sure a Trusted entry has a Digest.
fn personalize(entry: &Dictionary, params: &TssParams, default_flags: bool) -> Option<Dictionary> {
    let mut out = entry.clone();
    remove_keeping_order(&mut out, "Info");
    match rules(entry) {
        Some(r) => apply_restore_request_rules(&mut out, r, params),
        None if default_flags && params.supports_img4 => {
            out.insert("EPRO".into(), Value::Boolean(params.production_mode));
            out.insert("ESEC".into(), Value::Boolean(params.security_mode));
        }
        None => {}
    }
    if is_true(entry, "Trusted") && !entry.contains_key("Digest") {
        out.insert("Digest".into(), Value::Data(Vec::new()));
    }
    (!out.is_empty()).then_some(out)
}

/// The request entry for component `name` in the main AP ticket request, or `None` if the
/// component is not part of it.
pub fn ap_entry(name: &str, entry: &Value, params: &TssParams) -> Option<Dictionary> {
    let entry = entry.as_dictionary()?;
    if AP_SKIPPED.contains(&name) {
        return None;
    }
    let info = info(entry)?;
    if is_true(info, "IsFTAB") {
        return None;
    }
    if params.supports_img4 && rules(entry).is_none() && !is_true(entry, "Trusted") {
        return None;
    }
    personalize(entry, params, true)
}

/// The request entry for component `name` in the recoveryOS root ticket request.
pub fn recovery_entry(name: &str, entry: &Value, params: &TssParams) -> Option<Dictionary> {
    let entry = entry.as_dictionary()?;
    if AP_SKIPPED.contains(&name) || RECOVERY_SKIPPED.contains(&name) {
        return None;
    }
    personalize(entry, params, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(pairs: &[(&str, Value)]) -> Dictionary {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn rule(conds: &[(&str, Value)], acts: &[(&str, Value)]) -> Value {
        Value::Dictionary(dict(&[
            ("Conditions", Value::Dictionary(dict(conds))),
            ("Actions", Value::Dictionary(dict(acts))),
        ]))
    }

    #[test]
    fn rules_map_conditions_to_parameters() {
        let mut p = TssParams::new(1, None, None);
        p.production_mode = false;
        let rules = vec![
            rule(
                &[
                    ("ApRawProductionMode", Value::Boolean(false)),
                    ("ApRequiresImage4", Value::Boolean(true)),
                ],
                &[("EPRO", Value::Boolean(false))],
            ),
            rule(
                &[("ApCurrentProductionMode", Value::Boolean(true))],
                &[("EPRO", Value::Boolean(true))],
            ),
            rule(
                &[("ApRawSecurityMode", Value::Boolean(true))],
                &[("ESEC", Value::Boolean(true))],
            ),
            // Never fires: idevicerestore sets no DemotionPolicy.
            rule(
                &[("ApDemotionPolicyOverride", Value::String("Demote".into()))],
                &[("DPRO", Value::Boolean(true))],
            ),
            // Unknown condition: never fires.
            rule(
                &[("ApSomethingNew", Value::Boolean(true))],
                &[("ESEC", Value::Boolean(false))],
            ),
            // Non-boolean actions are ignored.
            rule(&[], &[("Weird", Value::String("x".into()))]),
        ];
        let mut entry = Dictionary::new();
        apply_restore_request_rules(&mut entry, &rules, &p);
        assert_eq!(
            entry,
            dict(&[
                ("EPRO", Value::Boolean(false)),
                ("ESEC", Value::Boolean(true))
            ])
        );
        p.demotion_policy = Some("Demote".into());
        apply_restore_request_rules(&mut entry, &rules, &p);
        assert_eq!(entry.get("DPRO"), Some(&Value::Boolean(true)));
    }

    #[test]
    fn ap_skip_rules() {
        let p = TssParams::new(1, None, None);
        let trusted_no_info = Value::Dictionary(dict(&[("Trusted", Value::Boolean(true))]));
        assert_eq!(ap_entry("X", &trusted_no_info, &p), None);
        let info = |pairs: &[(&str, Value)]| Value::Dictionary(dict(pairs));
        let ftab = Value::Dictionary(dict(&[
            ("Trusted", Value::Boolean(true)),
            ("Info", info(&[("IsFTAB", Value::Boolean(true))])),
        ]));
        assert_eq!(ap_entry("X", &ftab, &p), None);
        let untrusted = Value::Dictionary(dict(&[
            ("Digest", Value::Data(vec![1])),
            ("Info", info(&[])),
        ]));
        assert_eq!(ap_entry("X", &untrusted, &p), None);
        let trusted = Value::Dictionary(dict(&[
            ("Trusted", Value::Boolean(true)),
            ("Info", info(&[])),
        ]));
        assert_eq!(
            ap_entry("X", &trusted, &p),
            Some(dict(&[
                ("Trusted", Value::Boolean(true)),
                ("EPRO", Value::Boolean(true)),
                ("ESEC", Value::Boolean(true)),
                ("Digest", Value::Data(vec![])),
            ]))
        );
        assert_eq!(ap_entry("BaseSystem", &trusted, &p), None);
        assert_eq!(ap_entry("Ap,ExclaveOS", &trusted, &p), None);
        // Recovery: no defaults, its own skip list.
        assert_eq!(
            recovery_entry("X", &trusted, &p),
            Some(dict(&[
                ("Trusted", Value::Boolean(true)),
                ("Digest", Value::Data(vec![]))
            ]))
        );
        assert_eq!(recovery_entry("iBSS", &trusted, &p), None);
        assert_eq!(recovery_entry("X", &info(&[("Info", info(&[]))]), &p), None);
    }
}
