//! Expansion: valid definitions to tokens. Generated code names phaseflow only through
//! `::phaseflow::__private`, and holds data and marker impls — never an algorithm.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{DeriveInput, Ident};

use crate::errors::Errors;
use crate::schema::Env;
use crate::valid::{CheckedPhase, PhaseDef, PhaseRef, WorkflowDef};
use crate::{ast, fallback, valid};

/// `#[derive(Phase)]`.
pub(crate) fn derive_phase(input: &DeriveInput, env: &Env) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = ast::phase(input, &mut errors);
    let result = valid::phase(parsed, &input.generics, env, &mut errors);
    let tokens = match result {
        // A generic marker type cannot get these impls; the error says so.
        _ if !input.generics.params.is_empty() => TokenStream::new(),
        CheckedPhase::Valid(def) => phase_impls(&input.ident, &def),
        CheckedPhase::Invalid(stub) => fallback::phase(&input.ident, stub),
    };
    with_errors(errors, tokens)
}

/// `#[derive(Workflow)]`.
pub(crate) fn derive_workflow(input: &DeriveInput) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = ast::workflow(input, &mut errors);
    let def = valid::workflow(parsed, &input.generics, &mut errors);
    let tokens = if input.generics.params.is_empty() {
        workflow_impls(input, &def)
    } else {
        TokenStream::new()
    };
    with_errors(errors, tokens)
}

fn with_errors(errors: Errors, tokens: TokenStream) -> TokenStream {
    match errors.into_error() {
        Some(error) => {
            let mut out = error.into_compile_error();
            out.extend(tokens);
            out
        }
        None => tokens,
    }
}

fn phase_impls(ident: &Ident, def: &PhaseDef) -> TokenStream {
    let PhaseDef {
        key,
        role,
        artifact,
        schema,
        output,
        repair_budget,
        approval,
    } = def;
    let (schema_id, schema_path) = (&schema.id, &schema.path);
    let with_approval = approval.as_ref().map(|gate| quote!(.with_approval(#gate)));
    let marker = if approval.is_some() {
        quote!(HasApproval)
    } else {
        quote!(NoApproval)
    };
    quote! {
        #[automatically_derived]
        impl ::phaseflow::__private::Phase for #ident {
            const SPEC: ::phaseflow::__private::PhaseSpec = ::phaseflow::__private::PhaseSpec::new(
                #key,
                #role,
                #artifact,
                #schema_id,
                ::phaseflow::__private::include_str!(#schema_path),
            )
            .with_repair_budget(#repair_budget)
            #with_approval;
            type Output = #output;
        }

        #[automatically_derived]
        impl ::phaseflow::__private::#marker for #ident {}
    }
}

fn workflow_impls(input: &DeriveInput, def: &WorkflowDef) -> TokenStream {
    let ident = &input.ident;
    let vis = &input.vis;
    let state = format_ident!("{}State", ident);
    let name = &def.name;
    let phases = &def.phases;
    let specs = phases.iter().map(|p| {
        let path = &p.path;
        quote_spanned!(path.span()=> <#path as ::phaseflow::__private::Phase>::SPEC)
    });
    let first = match phases.first() {
        Some(p) => p.path.to_token_stream(),
        None => quote!(::phaseflow::__private::NoPhase),
    };
    let order = phases.iter().enumerate().map(|(index, p)| {
        let path = &p.path;
        let next = match phases.get(index + 1) {
            Some(next) => {
                let next = &next.path;
                quote!(::phaseflow::__private::Ready<#next>)
            }
            None => quote!(::phaseflow::__private::Completed),
        };
        quote_spanned! {path.span()=>
            #[automatically_derived]
            impl ::phaseflow::__private::InWorkflow<#ident> for #path {
                const INDEX: usize = #index;
                type Next = #next;
            }
        }
    });
    let variants = phases.iter().map(|PhaseRef { path, variant }| {
        let doc = format!(
            "The run is at phase `{}`.",
            path.to_token_stream().to_string().replace(' ', "")
        );
        quote! {
            #[doc = #doc]
            #variant(::phaseflow::__private::PhaseAt<#ident, #path>)
        }
    });
    // A binding in a pattern resolves to a same-named const of the user's if there is one, even
    // with mixed-site hygiene; these names cannot plausibly be a user's const.
    let at = Ident::new("__phaseflow_at", Span::mixed_site());
    let run = Ident::new("__phaseflow_run", Span::mixed_site());
    let arms = phases.iter().enumerate().map(|(index, PhaseRef { path, variant })| {
        quote!(#index => #at.into_phase::<#path>().map(Self::#variant),)
    });
    let unique_keys = duplicate_key_checks(ident, phases);
    let doc = format!(
        "Where a run of [`{ident}`] stands: the phase it is at and that phase's state, or how it \
         finished.\n\nReturned by `Engine::resume::<{ident}>()`. Generated by `#[derive(Workflow)]`."
    );
    let completed_doc = format!("Every phase of `{ident}` completed.");
    quote! {
        #[automatically_derived]
        impl ::phaseflow::__private::Workflow for #ident {
            const SPEC: ::phaseflow::__private::WorkflowSpec =
                ::phaseflow::__private::WorkflowSpec::new(#name, &[#(#specs),*]);
            type First = #first;
            type State = #state;
        }

        #(#order)*

        #[doc = #doc]
        #[derive(::phaseflow::__private::Debug)]
        #vis enum #state {
            #(#variants,)*
            #[doc = #completed_doc]
            Completed(::phaseflow::__private::Run<#ident, ::phaseflow::__private::Completed>),
            /// The run failed or was aborted.
            Ended(::phaseflow::__private::Run<#ident, ::phaseflow::__private::Ended>),
        }

        #[automatically_derived]
        impl ::phaseflow::__private::WorkflowState for #state {
            type Workflow = #ident;

            fn from_phase(
                #at: ::phaseflow::__private::ResumedPhase<#ident>,
            ) -> ::phaseflow::__private::Result<Self> {
                match #at.index() {
                    #(#arms)*
                    _ => ::phaseflow::__private::Err(#at.out_of_range()),
                }
            }

            fn from_completed(
                #run: ::phaseflow::__private::Run<#ident, ::phaseflow::__private::Completed>,
            ) -> Self {
                Self::Completed(#run)
            }

            fn from_ended(
                #run: ::phaseflow::__private::Run<#ident, ::phaseflow::__private::Ended>,
            ) -> Self {
                Self::Ended(#run)
            }
        }

        #(#unique_keys)*
    }
}

/// Phase keys are only known through each phase's `SPEC`, so uniqueness is a const assertion per
/// pair: a const-eval panic is a compile error that carries its message.
fn duplicate_key_checks<'a>(
    ident: &'a Ident,
    phases: &'a [PhaseRef],
) -> impl Iterator<Item = TokenStream> + 'a {
    phases.iter().enumerate().flat_map(move |(i, a)| {
        phases[i + 1..].iter().map(move |b| {
            let (pa, pb) = (&a.path, &b.path);
            let prefix = format!(
                "workflow `{ident}`: phases `{}` and `{}` both use key `",
                pa.to_token_stream().to_string().replace(' ', ""),
                pb.to_token_stream().to_string().replace(' ', ""),
            );
            let key_a = quote!(<#pa as ::phaseflow::__private::Phase>::SPEC.key_str());
            let key_b = quote!(<#pb as ::phaseflow::__private::Phase>::SPEC.key_str());
            quote_spanned! {pb.span()=>
                const _: () = {
                    if ::phaseflow::__private::str_eq(#key_a, #key_b) {
                        ::phaseflow::__private::panic!(
                            "{}",
                            ::phaseflow::__private::ConstMessage::new()
                                .push(#prefix)
                                .push(#key_a)
                                .push("`; each phase of a workflow needs its own key")
                                .as_str()
                        );
                    }
                };
            }
        })
    })
}
