//! Stub impls for a `#[derive(Phase)]` with errors, so the user sees the error in the attribute
//! and not a cascade of "`Plan` is not a phase" wherever the type is used (thiserror's
//! `fallback.rs`).

use proc_macro2::TokenStream;
use quote::{ToTokens, quote};
use syn::Ident;

use crate::valid::PhaseStub;

/// `Phase` with a placeholder spec (its key is unique per type name so a workflow's
/// duplicate-key check does not fire on two stubs), and the gate markers that are known — both
/// when the gate itself is in error, so neither `complete()` nor `request_approval()` adds an
/// error of its own.
pub(crate) fn phase(ident: &Ident, stub: PhaseStub) -> TokenStream {
    let output = stub
        .output
        .map_or_else(|| quote!(()), ToTokens::into_token_stream);
    let key = format!("invalid:{ident}");
    let has = quote! {
        #[automatically_derived]
        impl ::phaseflow::__private::HasApproval for #ident {}
    };
    let no = quote! {
        #[automatically_derived]
        impl ::phaseflow::__private::NoApproval for #ident {}
    };
    let markers = match stub.gated {
        Some(true) => has,
        Some(false) => no,
        None => quote!(#has #no),
    };
    quote! {
        #[automatically_derived]
        impl ::phaseflow::__private::Phase for #ident {
            const SPEC: ::phaseflow::__private::PhaseSpec =
                ::phaseflow::__private::PhaseSpec::new(#key, "", "", "", "");
            type Output = #output;
        }

        #markers
    }
}
