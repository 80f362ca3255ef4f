//! Parsing: `#[phase(...)]` and `#[workflow(...)]` from syn into plain structs.
//!
//! This stage checks syntax only: which keys exist, that each appears once, and that each value
//! has the right *shape* (a string literal, a type, a list of paths). What the values mean
//! (paths, budgets, the schema file, the phase graph) is `valid`'s business.

use proc_macro2::{Span, TokenTree};
use syn::meta::ParseNestedMeta;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{DeriveInput, Expr, ExprLit, Ident, Lit, LitStr, Path, Token, Type};

use crate::errors::Errors;

/// The keys `#[phase(...)]` accepts, in the order the docs list them.
pub(crate) const PHASE_KEYS: &[&str] = &[
    "key",
    "role",
    "artifact",
    "schema",
    "output",
    "repair_budget",
    "approval",
];

/// The keys `#[workflow(...)]` accepts.
pub(crate) const WORKFLOW_KEYS: &[&str] = &["name", "phases"];

/// A `#[derive(Phase)]` input as written.
pub(crate) struct PhaseInput<'a> {
    /// The type the derive is on.
    pub(crate) ident: &'a Ident,
    /// Where to point "missing key" errors: the first `#[phase]` attribute, or the type name.
    pub(crate) span: Span,
    /// Whether any `#[phase]` attribute was present.
    pub(crate) has_attr: bool,
    /// Keys that were written, even with a malformed value (so they are not also "missing").
    pub(crate) given: Vec<String>,
    pub(crate) key: Option<LitStr>,
    pub(crate) role: Option<LitStr>,
    pub(crate) artifact: Option<LitStr>,
    pub(crate) schema: Option<LitStr>,
    pub(crate) output: Option<Type>,
    pub(crate) repair_budget: Option<Expr>,
    pub(crate) approval: Option<LitStr>,
}

/// A `#[derive(Workflow)]` input as written.
pub(crate) struct WorkflowInput<'a> {
    /// The type the derive is on.
    pub(crate) ident: &'a Ident,
    /// Where to point "missing key" errors.
    pub(crate) span: Span,
    /// Whether any `#[workflow]` attribute was present.
    pub(crate) has_attr: bool,
    /// Keys that were written, even with a malformed value.
    pub(crate) given: Vec<String>,
    pub(crate) name: Option<LitStr>,
    pub(crate) phases: Option<PhaseList>,
}

/// `phases(A, B, C)`.
pub(crate) struct PhaseList {
    /// The whole `phases(...)` item.
    pub(crate) span: Span,
    /// The phase types in order.
    pub(crate) paths: Vec<Path>,
}

/// Parses every `#[phase(...)]` attribute of `input`, recording problems in `errors`.
pub(crate) fn phase<'a>(input: &'a DeriveInput, errors: &mut Errors) -> PhaseInput<'a> {
    let mut parsed = PhaseInput {
        ident: &input.ident,
        span: input.ident.span(),
        has_attr: false,
        given: Vec::new(),
        key: None,
        role: None,
        artifact: None,
        schema: None,
        output: None,
        repair_budget: None,
        approval: None,
    };
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("phase")) {
        if !parsed.has_attr {
            parsed.has_attr = true;
            parsed.span = attr.path().span();
        }
        let result = attr.parse_nested_meta(|meta| {
            let name = key_name(&meta, "phase", PHASE_KEYS, errors);
            parsed.given.extend(name.clone());
            match name.as_deref() {
                Some("key") => {
                    let value = string(&meta, "key", errors)?;
                    set(&mut parsed.key, &meta, "phase", value, errors);
                }
                Some("role") => {
                    let value = string(&meta, "role", errors)?;
                    set(&mut parsed.role, &meta, "phase", value, errors);
                }
                Some("artifact") => {
                    let value = string(&meta, "artifact", errors)?;
                    set(&mut parsed.artifact, &meta, "phase", value, errors);
                }
                Some("schema") => {
                    let value = string(&meta, "schema", errors)?;
                    set(&mut parsed.schema, &meta, "phase", value, errors);
                }
                Some("output") => {
                    let value: Type = meta.value()?.parse()?;
                    set(&mut parsed.output, &meta, "phase", Some(value), errors);
                }
                Some("repair_budget") => {
                    let value: Expr = meta.value()?.parse()?;
                    set(
                        &mut parsed.repair_budget,
                        &meta,
                        "phase",
                        Some(value),
                        errors,
                    );
                }
                Some("approval") => {
                    let value = string(&meta, "approval", errors)?;
                    set(&mut parsed.approval, &meta, "phase", value, errors);
                }
                _ => skip_value(&meta)?,
            }
            Ok(())
        });
        if let Err(error) = result {
            errors.push(error);
        }
    }
    parsed
}

/// Parses every `#[workflow(...)]` attribute of `input`, recording problems in `errors`.
pub(crate) fn workflow<'a>(input: &'a DeriveInput, errors: &mut Errors) -> WorkflowInput<'a> {
    let mut parsed = WorkflowInput {
        ident: &input.ident,
        span: input.ident.span(),
        has_attr: false,
        given: Vec::new(),
        name: None,
        phases: None,
    };
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("workflow")) {
        if !parsed.has_attr {
            parsed.has_attr = true;
            parsed.span = attr.path().span();
        }
        let result = attr.parse_nested_meta(|meta| {
            let name = key_name(&meta, "workflow", WORKFLOW_KEYS, errors);
            parsed.given.extend(name.clone());
            match name.as_deref() {
                Some("name") => {
                    let value = string(&meta, "name", errors)?;
                    set(&mut parsed.name, &meta, "workflow", value, errors);
                }
                Some("phases") => {
                    let list = phase_list(&meta)?;
                    set(&mut parsed.phases, &meta, "workflow", Some(list), errors);
                }
                _ => skip_value(&meta)?,
            }
            Ok(())
        });
        if let Err(error) = result {
            errors.push(error);
        }
    }
    parsed
}

/// The key of one `name = value` item, or `None` (error recorded) when it is not a known key.
fn key_name(
    meta: &ParseNestedMeta<'_>,
    attr: &str,
    known: &[&str],
    errors: &mut Errors,
) -> Option<String> {
    let Some(ident) = meta.path.get_ident() else {
        errors.spanned(
            &meta.path,
            format!(
                "expected a key of `#[{attr}(...)]`, one of: {}",
                known.join(", ")
            ),
        );
        return None;
    };
    let name = ident.to_string();
    if known.contains(&name.as_str()) {
        return Some(name);
    }
    let suggestion = closest(&name, known)
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
    errors.spanned(
        ident,
        format!(
            "unknown key `{name}` in `#[{attr}(...)]`{suggestion} (accepted keys: {})",
            known.join(", ")
        ),
    );
    None
}

/// Stores `value` in `slot`, or records a "duplicate" error (the first value wins).
fn set<T>(
    slot: &mut Option<T>,
    meta: &ParseNestedMeta<'_>,
    attr: &str,
    value: Option<T>,
    errors: &mut Errors,
) {
    let Some(value) = value else { return };
    if slot.is_some() {
        let key = meta
            .path
            .get_ident()
            .map(Ident::to_string)
            .unwrap_or_default();
        errors.spanned(
            &meta.path,
            format!("duplicate key `{key}` in `#[{attr}(...)]`; each key may be given once"),
        );
    } else {
        *slot = Some(value);
    }
}

/// A `key = "string"` value. A value of another shape is recorded in `errors` (so parsing goes
/// on with the next key) and yields `None`; only malformed syntax is an `Err`.
fn string(
    meta: &ParseNestedMeta<'_>,
    key: &str,
    errors: &mut Errors,
) -> syn::Result<Option<LitStr>> {
    let value: Expr = meta.value()?.parse()?;
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Ok(Some(lit)),
        other => {
            errors.spanned(
                other,
                format!(
                    "`{key}` takes a string literal, like `{key} = \"{}\"`",
                    example(key)
                ),
            );
            Ok(None)
        }
    }
}

fn example(key: &str) -> &'static str {
    match key {
        "key" => "plan",
        "role" => "planner",
        "artifact" => "phaseflow/plan.json",
        "schema" => "schemas/plan.schema.json",
        "approval" => "plan_review",
        "name" => "feature",
        _ => "...",
    }
}

/// `phases(A, B, C)`.
fn phase_list(meta: &ParseNestedMeta<'_>) -> syn::Result<PhaseList> {
    if !meta.input.peek(syn::token::Paren) {
        return Err(
            meta.error("write the phases in parentheses, in order: `phases(Plan, Implement)`")
        );
    }
    let content;
    syn::parenthesized!(content in meta.input);
    let paths = Punctuated::<Path, Token![,]>::parse_terminated(&content)?;
    Ok(PhaseList {
        span: meta.path.span(),
        paths: paths.into_iter().collect(),
    })
}

/// Consumes the value of an unknown key (`= value` or `(...)`) up to the next comma.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    meta.input.step(|cursor| {
        let mut rest = *cursor;
        while let Some((tt, next)) = rest.token_tree() {
            if matches!(&tt, TokenTree::Punct(p) if p.as_char() == ',') {
                return Ok(((), rest));
            }
            rest = next;
        }
        Ok(((), rest))
    })
}

/// The known key closest to a misspelt one, if it is close enough to be a typo.
fn closest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::ToTokens;
    use syn::parse_quote;

    #[test]
    fn phase_attributes_parse_into_plain_values() {
        let input: DeriveInput = parse_quote! {
            #[phase(key = "plan", role = "planner", artifact = "a.json", schema = "s.json",
                    output = Vec<String>, repair_budget = 3, approval = "review")]
            struct Plan;
        };
        let mut errors = Errors::default();
        let parsed = phase(&input, &mut errors);
        assert_eq!(errors.messages(), Vec::<String>::new());
        assert_eq!(parsed.key.unwrap().value(), "plan");
        assert_eq!(
            parsed.output.unwrap().to_token_stream().to_string(),
            "Vec < String >"
        );
        assert_eq!(
            parsed.repair_budget.unwrap().to_token_stream().to_string(),
            "3"
        );
        assert_eq!(parsed.approval.unwrap().value(), "review");
    }

    #[test]
    fn unknown_and_duplicated_keys_are_all_reported() {
        let input: DeriveInput = parse_quote! {
            #[phase(kye = "plan", key = "a", key = "b", colour = blue)]
            #[phase(role = 7)]
            struct Plan;
        };
        let mut errors = Errors::default();
        let parsed = phase(&input, &mut errors);
        assert_eq!(
            errors.messages(),
            [
                "unknown key `kye` in `#[phase(...)]`; did you mean `key`? (accepted keys: key, role, artifact, schema, output, repair_budget, approval)",
                "duplicate key `key` in `#[phase(...)]`; each key may be given once",
                "unknown key `colour` in `#[phase(...)]` (accepted keys: key, role, artifact, schema, output, repair_budget, approval)",
                "`role` takes a string literal, like `role = \"planner\"`",
            ]
        );
        assert_eq!(parsed.key.unwrap().value(), "a", "the first value wins");
    }

    #[test]
    fn workflow_phases_keep_their_order() {
        let input: DeriveInput = parse_quote! {
            #[workflow(name = "feature", phases(Plan, crate::phases::Implement, Review,))]
            struct Feature;
        };
        let mut errors = Errors::default();
        let parsed = workflow(&input, &mut errors);
        assert_eq!(errors.messages(), Vec::<String>::new());
        let paths: Vec<String> = parsed
            .phases
            .unwrap()
            .paths
            .iter()
            .map(|p| p.to_token_stream().to_string())
            .collect();
        assert_eq!(paths, ["Plan", "crate :: phases :: Implement", "Review"]);
    }

    #[test]
    fn phases_must_be_parenthesised() {
        let input: DeriveInput = parse_quote! {
            #[workflow(name = "feature", phases = [Plan])]
            struct Feature;
        };
        let mut errors = Errors::default();
        workflow(&input, &mut errors);
        assert_eq!(
            errors.messages(),
            ["write the phases in parentheses, in order: `phases(Plan, Implement)`"]
        );
    }

    #[test]
    fn typos_close_to_a_key_get_a_suggestion() {
        assert_eq!(closest("repair_budgte", PHASE_KEYS), Some("repair_budget"));
        assert_eq!(closest("approvl", PHASE_KEYS), Some("approval"));
        assert_eq!(closest("colour", PHASE_KEYS), None);
    }
}
