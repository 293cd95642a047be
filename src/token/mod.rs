//! Getting an access token: building the token request (RFC 6749 §4.4.2, client authentication
//! per §2.3.1), parsing the token response (§5.1 success, §5.2 error), and sending one over any
//! transport ([`TokenFetcher`]).

mod fetcher;
mod request;
mod response;

pub(crate) use fetcher::{FetchedToken, TokenFetcher};
pub use fetcher::{TokenTransportBody, TokenTransportRequest};
pub(crate) use request::TokenRequestTemplate;
