//! Validation: what the parsed values mean. Keys, artifact paths, repair budgets, the schema
//! file, and the phase list of a workflow. Everything wrong is recorded; what is right is kept
//! so the expansion can still emit impls (one mistake, one error).

use std::collections::BTreeMap;

use quote::ToTokens;
use syn::{Expr, ExprLit, ExprUnary, Generics, Ident, Lit, LitStr, Path, Type, UnOp};

use crate::ast::{PhaseInput, WorkflowInput};
use crate::errors::Errors;
use crate::schema::{self, Env, SchemaFile};

/// The largest `repair_budget`: each repair re-prompts the agent, and a phase that needs more
/// than this many repairs in one round needs a human.
pub(crate) const MAX_REPAIR_BUDGET: u64 = 16;

/// Keys (phase key, role, gate, workflow name) longer than this are refused.
const MAX_KEY_LEN: usize = 64;

/// Variant names the generated state enum uses for finished runs.
pub(crate) const RESERVED_VARIANTS: &[&str] = &["Completed", "Ended"];

/// A phase whose every attribute is valid.
pub(crate) struct PhaseDef {
    pub(crate) key: String,
    pub(crate) role: String,
    pub(crate) artifact: String,
    pub(crate) schema: SchemaFile,
    pub(crate) output: Type,
    pub(crate) repair_budget: u32,
    pub(crate) approval: Option<String>,
}

/// What is known about a phase whose attributes have errors, for the stub impls.
pub(crate) struct PhaseStub {
    /// The output type, if it was given.
    pub(crate) output: Option<Type>,
    /// Whether the phase has a gate, if that much is known.
    pub(crate) gated: Option<bool>,
}

/// The outcome of checking a `#[phase]`.
pub(crate) enum CheckedPhase {
    /// Every attribute is valid.
    Valid(PhaseDef),
    /// Some are not (the problems are in the `Errors`); what the stub impls need.
    Invalid(PhaseStub),
}

/// Checks a parsed `#[phase]`, recording problems in `errors`.
pub(crate) fn phase(
    input: PhaseInput<'_>,
    generics: &Generics,
    env: &Env,
    errors: &mut Errors,
) -> CheckedPhase {
    no_generics(generics, "Phase", errors);
    let ident = input.ident;
    if !input.has_attr {
        errors.spanned(
            ident,
            format!(
                "`#[derive(Phase)]` on `{ident}` needs a `#[phase(...)]` attribute with at least `key`, `role`, `artifact`, `schema` and `output`"
            ),
        );
    } else {
        for (key, what) in [
            (
                "key",
                "the phase key, unique in its workflow, like `key = \"plan\"`",
            ),
            (
                "role",
                "the agent role whose session writes the artifact, like `role = \"planner\"`",
            ),
            (
                "artifact",
                "the artifact path in the run's worktree, like `artifact = \"phaseflow/plan.json\"`",
            ),
            (
                "schema",
                "the JSON Schema file of the artifact, like `schema = \"schemas/plan.schema.json\"`",
            ),
            (
                "output",
                "the type the validated artifact deserializes into, like `output = PlanDoc`",
            ),
        ] {
            if !input.given.iter().any(|g| g == key) {
                errors.at(
                    input.span,
                    format!("`#[phase]` on `{ident}` is missing `{key}`: {what}"),
                );
            }
        }
    }

    let key = input
        .key
        .as_ref()
        .and_then(|lit| key_like(lit, "key", errors));
    let role = input
        .role
        .as_ref()
        .and_then(|lit| key_like(lit, "role", errors));
    let approval = input
        .approval
        .as_ref()
        .map(|lit| key_like(lit, "approval", errors));
    let artifact = input
        .artifact
        .as_ref()
        .and_then(|lit| match artifact_path(&lit.value()) {
            Ok(()) => Some(lit.value()),
            Err(message) => {
                errors.spanned(lit, message);
                None
            }
        });
    let schema = input
        .schema
        .as_ref()
        .and_then(|lit| match schema::load(&lit.value(), env) {
            Ok(file) => Some(file),
            Err(message) => {
                errors.spanned(lit, message);
                None
            }
        });
    let repair_budget = match &input.repair_budget {
        None => Some(1),
        Some(expr) => match repair_budget(expr) {
            Ok(n) => Some(n),
            Err(message) => {
                errors.spanned(expr, message);
                None
            }
        },
    };

    // `approval`: not given (no gate), given and valid (a gate), or given but invalid (unknown).
    let gated = match &approval {
        None => Some(false),
        Some(Some(_)) => Some(true),
        Some(None) => None,
    };
    match (
        key,
        role,
        artifact,
        schema,
        input.output,
        repair_budget,
        approval,
    ) {
        (
            Some(key),
            Some(role),
            Some(artifact),
            Some(schema),
            Some(output),
            Some(repair_budget),
            approval @ (None | Some(Some(_))),
        ) => CheckedPhase::Valid(PhaseDef {
            key,
            role,
            artifact,
            schema,
            output,
            repair_budget,
            approval: approval.flatten(),
        }),
        (.., output, _, _) => CheckedPhase::Invalid(PhaseStub { output, gated }),
    }
}

/// A workflow whose attributes are valid, or the valid part of one that has errors.
pub(crate) struct WorkflowDef {
    pub(crate) name: String,
    pub(crate) phases: Vec<PhaseRef>,
}

/// One phase of a workflow.
pub(crate) struct PhaseRef {
    /// The type as written in `phases(...)`.
    pub(crate) path: Path,
    /// Its variant in the generated state enum (the last path segment).
    pub(crate) variant: Ident,
}

/// Checks a parsed `#[workflow]`. Always returns what can be expanded; problems are in `errors`
/// (duplicated or unusable phases are left out so the rest still type-checks).
pub(crate) fn workflow(
    input: WorkflowInput<'_>,
    generics: &Generics,
    errors: &mut Errors,
) -> WorkflowDef {
    no_generics(generics, "Workflow", errors);
    let ident = input.ident;
    if !input.has_attr {
        errors.spanned(
            ident,
            format!("`#[derive(Workflow)]` on `{ident}` needs a `#[workflow(name = \"...\", phases(...))]` attribute"),
        );
    } else {
        if !input.given.iter().any(|g| g == "name") {
            errors.at(
                input.span,
                format!("`#[workflow]` on `{ident}` is missing `name`: the workflow name stored with every run, like `name = \"feature\"`"),
            );
        }
        if !input.given.iter().any(|g| g == "phases") {
            errors.at(
                input.span,
                format!("`#[workflow]` on `{ident}` is missing `phases`: the phase types in order, like `phases(Plan, Implement)`"),
            );
        }
    }
    let name = input
        .name
        .as_ref()
        .and_then(|lit| key_like(lit, "name", errors))
        .unwrap_or_default();

    let mut phases = Vec::new();
    if let Some(list) = input.phases {
        if list.paths.is_empty() {
            errors.at(
                list.span,
                format!("workflow `{ident}` has no phases; list at least one phase type, like `phases(Plan, Implement)`"),
            );
        }
        let mut seen_paths: BTreeMap<String, ()> = BTreeMap::new();
        let mut seen_variants: BTreeMap<String, String> = BTreeMap::new();
        for path in list.paths {
            let written = path_text(&path);
            let Some(last) = path.segments.last() else {
                continue;
            };
            if !last.arguments.is_empty() {
                errors.spanned(
                    &path,
                    format!("phase `{written}` has generic arguments; phases are plain types"),
                );
                continue;
            }
            let variant = last.ident.clone();
            if seen_paths.insert(written.clone(), ()).is_some() {
                errors.spanned(
                    &path,
                    format!(
                        "phase `{written}` appears twice in workflow `{ident}`; a phase runs once per run, so declare another phase type (with its own key) to repeat a step"
                    ),
                );
                continue;
            }
            if RESERVED_VARIANTS.contains(&variant.to_string().as_str()) {
                errors.spanned(
                    &path,
                    format!(
                        "a phase cannot be named `{variant}`: `{ident}State::{variant}` is the generated state of a finished run; rename the phase type"
                    ),
                );
                continue;
            }
            if let Some(other) = seen_variants.insert(variant.to_string(), written.clone()) {
                errors.spanned(
                    &path,
                    format!(
                        "phases `{other}` and `{written}` would both be `{ident}State::{variant}`; rename one of the types"
                    ),
                );
                continue;
            }
            phases.push(PhaseRef { path, variant });
        }
    }
    WorkflowDef { name, phases }
}

fn no_generics(generics: &Generics, derive: &str, errors: &mut Errors) {
    if !generics.params.is_empty() {
        errors.spanned(
            &generics.params,
            format!("`#[derive({derive})]` does not support generic parameters; a {} is a plain marker type", derive.to_lowercase()),
        );
    }
}

fn path_text(path: &Path) -> String {
    path.to_token_stream().to_string().replace(' ', "")
}

/// A key, role, gate or workflow name: non-empty, short, and made of characters that are safe in
/// idempotency keys (`{run}:{gate}:{phase}:{attempt}` must split unambiguously).
fn key_like(lit: &LitStr, what: &str, errors: &mut Errors) -> Option<String> {
    let value = lit.value();
    let problem = if value.is_empty() {
        Some(format!("`{what}` must not be empty"))
    } else if value.len() > MAX_KEY_LEN {
        Some(format!(
            "`{what}` is {} bytes long; keep it to at most {MAX_KEY_LEN}",
            value.len()
        ))
    } else if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        Some(format!(
            "`{what} = {value:?}` contains {c:?}; use only ASCII letters, digits, `_`, `-` and `.`"
        ))
    } else if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Some(format!(
            "`{what} = {value:?}` must start with an ASCII letter or digit"
        ))
    } else {
        None
    };
    match problem {
        Some(message) => {
            errors.spanned(lit, message);
            None
        }
        None => Some(value),
    }
}

/// An artifact path must be a relative path to a file that stays inside the worktree.
fn artifact_path(path: &str) -> Result<(), String> {
    let example = "like `artifact = \"phaseflow/plan.json\"`";
    if path.is_empty() {
        return Err(format!(
            "`artifact` must not be empty: name the file the agent writes, relative to the run's worktree, {example}"
        ));
    }
    if path.contains('\0') {
        return Err("`artifact` contains a NUL byte".into());
    }
    let bytes = path.as_bytes();
    let drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    if path.starts_with(['/', '\\']) || drive {
        return Err(format!(
            "`artifact = {path:?}` is an absolute path; artifact paths are relative to the run's worktree, {example}"
        ));
    }
    let parts: Vec<&str> = path.split(['/', '\\']).collect();
    if parts.contains(&"..") {
        return Err(format!(
            "`artifact = {path:?}` escapes the worktree through `..`; the artifact must stay inside the run's worktree"
        ));
    }
    if matches!(parts.last(), Some(&"" | &".")) {
        return Err(format!(
            "`artifact = {path:?}` names a directory; name the file the agent writes, {example}"
        ));
    }
    Ok(())
}

/// `repair_budget = N` with `0 <= N <= MAX_REPAIR_BUDGET`.
fn repair_budget(expr: &Expr) -> Result<u32, String> {
    let usage = format!(
        "`repair_budget` takes an integer from 0 to {MAX_REPAIR_BUDGET}, like `repair_budget = 2`"
    );
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) => {
            if !matches!(int.suffix(), "" | "u8" | "u16" | "u32" | "u64" | "usize") {
                return Err(format!("{usage}; found the suffix `{}`", int.suffix()));
            }
            match int.base10_parse::<u64>() {
                Ok(n) if n <= MAX_REPAIR_BUDGET => Ok(n as u32),
                _ => Err(format!(
                    "`repair_budget = {}` is too large: at most {MAX_REPAIR_BUDGET} repair prompts per round, after that a human decides",
                    int.base10_digits()
                )),
            }
        }
        Expr::Unary(ExprUnary {
            op: UnOp::Neg(_), ..
        }) => Err(format!(
            "`repair_budget = {}` is negative; it counts repair prompts, from 0 (none) to {MAX_REPAIR_BUDGET}",
            expr.to_token_stream().to_string().replace(' ', "")
        )),
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Err(format!(
            "`repair_budget` takes an integer, not a string: write `repair_budget = {}`",
            s.value()
        )),
        _ => Err(usage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syn::{DeriveInput, parse_quote};

    fn env() -> Env {
        Env {
            manifest_dir: Some(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")),
            source_file: None,
        }
    }

    fn check_phase(input: DeriveInput) -> (CheckedPhase, Vec<String>) {
        let mut errors = Errors::default();
        let parsed = crate::ast::phase(&input, &mut errors);
        let result = phase(parsed, &input.generics, &env(), &mut errors);
        (result, errors.messages())
    }

    #[test]
    fn a_complete_phase_is_valid_with_the_default_budget() {
        let (def, errors) = check_phase(parse_quote! {
            #[phase(key = "plan", role = "planner", artifact = "phaseflow/plan.json",
                    schema = "schemas/plan.schema.json", output = PlanDoc, approval = "plan_review")]
            struct Plan;
        });
        assert!(errors.is_empty(), "{errors:?}");
        let CheckedPhase::Valid(def) = def else {
            panic!("invalid")
        };
        assert_eq!((def.key.as_str(), def.repair_budget), ("plan", 1));
        assert_eq!(def.approval.as_deref(), Some("plan_review"));
        assert_eq!(def.schema.id, "plan.schema.json");
    }

    #[test]
    fn every_problem_of_a_phase_is_reported() {
        let (def, errors) = check_phase(parse_quote! {
            #[phase(key = "", artifact = "../x.json", schema = "schemas/nope.json",
                    output = X, repair_budget = -1, approval = "a:b")]
            struct Plan;
        });
        assert!(matches!(def, CheckedPhase::Invalid(_)));
        assert_eq!(errors.len(), 6, "{errors:#?}");
        assert_eq!(
            errors[0],
            "`#[phase]` on `Plan` is missing `role`: the agent role whose session writes the artifact, like `role = \"planner\"`"
        );
        assert_eq!(errors[1], "`key` must not be empty");
        assert_eq!(
            errors[2],
            "`approval = \"a:b\"` contains ':'; use only ASCII letters, digits, `_`, `-` and `.`"
        );
        assert!(errors[3].contains("escapes the worktree"));
        assert!(errors[4].starts_with("schema file `schemas/nope.json` not found"));
        assert!(errors[5].starts_with("`repair_budget = -1` is negative"));
    }

    #[test]
    fn the_stub_of_an_invalid_phase_keeps_what_is_known() {
        let (def, _) = check_phase(parse_quote! {
            #[phase(key = "plan", role = "planner", artifact = "/abs.json",
                    schema = "schemas/plan.schema.json", output = PlanDoc)]
            struct Plan;
        });
        let CheckedPhase::Invalid(stub) = def else {
            panic!("valid")
        };
        assert_eq!(stub.gated, Some(false));
        assert!(stub.output.is_some());
    }

    #[test]
    fn artifact_paths_must_be_relative_files_inside_the_worktree() {
        assert!(artifact_path("phaseflow/plan.json").is_ok());
        assert!(artifact_path("./plan.json").is_ok());
        assert!(
            artifact_path("/tmp/plan.json")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            artifact_path("C:\\plan.json")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            artifact_path("a/../../plan.json")
                .unwrap_err()
                .contains("`..`")
        );
        assert!(
            artifact_path("a\\..\\plan.json")
                .unwrap_err()
                .contains("`..`")
        );
        assert!(artifact_path("out/").unwrap_err().contains("directory"));
        assert!(artifact_path("").unwrap_err().contains("must not be empty"));
    }

    #[test]
    fn repair_budgets_are_small_non_negative_integers() {
        let budget = |e: Expr| repair_budget(&e);
        assert_eq!(budget(parse_quote!(0)), Ok(0));
        assert_eq!(budget(parse_quote!(16u32)), Ok(16));
        assert!(budget(parse_quote!(17)).unwrap_err().contains("too large"));
        assert!(
            budget(parse_quote!(99999999999999999999999))
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(
            budget(parse_quote!(-1)).unwrap_err(),
            "`repair_budget = -1` is negative; it counts repair prompts, from 0 (none) to 16"
        );
        assert!(
            budget(parse_quote!("2"))
                .unwrap_err()
                .contains("not a string")
        );
        assert!(
            budget(parse_quote!(2i8))
                .unwrap_err()
                .contains("suffix `i8`")
        );
        assert!(
            budget(parse_quote!(1.5))
                .unwrap_err()
                .starts_with("`repair_budget` takes an integer from 0 to 16")
        );
    }

    fn check_workflow(input: DeriveInput) -> (WorkflowDef, Vec<String>) {
        let mut errors = Errors::default();
        let parsed = crate::ast::workflow(&input, &mut errors);
        let def = workflow(parsed, &input.generics, &mut errors);
        (def, errors.messages())
    }

    #[test]
    fn duplicated_and_clashing_phases_are_refused_and_left_out() {
        let (def, errors) = check_workflow(parse_quote! {
            #[workflow(name = "feature", phases(Plan, Implement, Plan, a::Implement, Completed))]
            struct Feature;
        });
        let kept: Vec<String> = def.phases.iter().map(|p| p.variant.to_string()).collect();
        assert_eq!(kept, ["Plan", "Implement"]);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].starts_with("phase `Plan` appears twice in workflow `Feature`"));
        assert!(errors[1].starts_with(
            "phases `Implement` and `a::Implement` would both be `FeatureState::Implement`"
        ));
        assert!(errors[2].starts_with("a phase cannot be named `Completed`"));
    }

    #[test]
    fn a_workflow_needs_a_name_and_at_least_one_phase() {
        let (_, errors) = check_workflow(parse_quote! {
            #[workflow(phases())]
            struct Feature;
        });
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].starts_with("`#[workflow]` on `Feature` is missing `name`"));
        assert!(errors[1].starts_with("workflow `Feature` has no phases"));
    }
}
