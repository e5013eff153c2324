//! Template parameter validation: defaults filled in, types, options and limits checked, with
//! messages that tell the model (or the user) exactly what to change.

use agentplane_schema::api::{ParamType, TemplateParameter};
use serde_json::{Map, Value};

/// Checks a template's parameter declarations: unique names, enum options, compilable
/// patterns, defaults that pass their own validation.
pub fn check_spec(spec: &[TemplateParameter]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for p in spec {
        if p.name.trim().is_empty() || !seen.insert(p.name.as_str()) {
            return Err(format!("parameter names must be unique and non-empty (`{}`)", p.name));
        }
        if p.param_type == ParamType::Enum && p.options.is_empty() {
            return Err(format!("enum parameter `{}` needs `options`", p.name));
        }
        if let Some(pattern) = p.validation.as_ref().and_then(|v| v.pattern.as_deref()) {
            regex::Regex::new(pattern).map_err(|e| format!("parameter `{}`: invalid pattern: {e}", p.name))?;
        }
        if let Some(default) = &p.default {
            check(p, default).map_err(|e| format!("default of `{}` {e}", p.name))?;
        }
    }
    Ok(())
}

/// Returns the complete parameter object, or every problem found, joined.
pub fn validate(spec: &[TemplateParameter], given: &Value) -> Result<Value, String> {
    let empty = Map::new();
    let given = match given {
        Value::Object(m) => m,
        Value::Null => &empty,
        other => return Err(format!("parameters must be an object, got {other}")),
    };
    let mut problems = Vec::new();
    for name in given.keys() {
        if !spec.iter().any(|p| &p.name == name) {
            let known: Vec<&str> = spec.iter().map(|p| p.name.as_str()).collect();
            problems.push(format!(
                "unknown parameter `{name}` (known: {})",
                if known.is_empty() { "none".into() } else { known.join(", ") }
            ));
        }
    }
    let mut out = Map::new();
    for p in spec {
        let value = match given.get(&p.name).filter(|v| !v.is_null()).or(p.default.as_ref()) {
            Some(v) => v.clone(),
            None if p.required => {
                problems.push(format!("`{}` is required", p.name));
                continue;
            }
            None => continue,
        };
        match check(p, &value) {
            Ok(v) => {
                out.insert(p.name.clone(), v);
            }
            Err(e) => problems.push(format!("`{}` {e}", p.name)),
        }
    }
    if problems.is_empty() { Ok(Value::Object(out)) } else { Err(problems.join("; ")) }
}

fn check(p: &TemplateParameter, value: &Value) -> Result<Value, String> {
    let v = p.validation.clone().unwrap_or_default();
    match p.param_type {
        ParamType::String => {
            let s = value.as_str().ok_or_else(|| format!("must be a string, got {value}"))?;
            let len = s.chars().count();
            if let Some(min) = v.min_length.filter(|m| len < *m) {
                return Err(format!("must be at least {min} characters"));
            }
            if let Some(max) = v.max_length.filter(|m| len > *m) {
                return Err(format!("must be at most {max} characters"));
            }
            if let Some(pattern) = &v.pattern {
                let re = regex::Regex::new(pattern).map_err(|e| format!("has an invalid pattern: {e}"))?;
                if !re.is_match(s) {
                    return Err(format!("must match the pattern {pattern}"));
                }
            }
            Ok(value.clone())
        }
        ParamType::Number => {
            let n = value.as_f64().ok_or_else(|| format!("must be a number, got {value}"))?;
            if let Some(min) = v.min.filter(|m| n < *m) {
                return Err(format!("must be at least {min}"));
            }
            if let Some(max) = v.max.filter(|m| n > *m) {
                return Err(format!("must be at most {max}"));
            }
            Ok(value.clone())
        }
        ParamType::Bool => {
            value.as_bool().map(Value::Bool).ok_or_else(|| format!("must be true or false, got {value}"))
        }
        ParamType::Enum => {
            let s = value.as_str().ok_or_else(|| format!("must be one of {}", p.options.join(", ")))?;
            if p.options.iter().any(|o| o == s) {
                Ok(value.clone())
            } else {
                Err(format!("must be one of {}, got `{s}`", p.options.join(", ")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use agentplane_schema::api::ParamValidation;
    use serde_json::json;

    use super::*;

    fn param(name: &str, t: ParamType) -> TemplateParameter {
        TemplateParameter {
            name: name.into(),
            param_type: t,
            description: String::new(),
            default: None,
            required: false,
            options: vec![],
            validation: None,
        }
    }

    #[test]
    fn fills_defaults_and_checks_types() {
        let mut cpu = param("cpus", ParamType::Number);
        cpu.default = Some(json!(2));
        cpu.validation = Some(ParamValidation { min: Some(1.0), max: Some(8.0), ..Default::default() });
        let mut lang = param("lang", ParamType::Enum);
        lang.options = vec!["rust".into(), "go".into()];
        lang.required = true;
        let mut name = param("branch", ParamType::String);
        name.validation = Some(ParamValidation { pattern: Some("^[a-z0-9-]+$".into()), ..Default::default() });
        let spec = vec![cpu, lang, name];
        assert_eq!(validate(&spec, &json!({"lang": "go"})).expect("ok"), json!({"cpus": 2, "lang": "go"}));
        let err = validate(&spec, &json!({"cpus": 99, "branch": "Bad Branch", "x": 1})).expect_err("bad");
        assert!(err.contains("`cpus` must be at most 8"), "{err}");
        assert!(err.contains("`lang` is required"), "{err}");
        assert!(err.contains("`branch` must match"), "{err}");
        assert!(err.contains("unknown parameter `x`"), "{err}");
        assert!(validate(&spec, &json!({"lang": "java"})).expect_err("enum").contains("one of rust, go"));
    }
}
