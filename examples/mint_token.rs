//! Mints an HS256 bearer token for trying order-saga out with `AUTH_JWT_SECRET`: a real
//! deployment gets its tokens from its identity provider instead.
//!
//! ```sh
//! export AUTH_JWT_SECRET=$(head -c 32 /dev/urandom | base64)
//! cargo run --example mint_token -- --sub alice --scope orders
//! cargo run --example mint_token -- --sub ops-1 --scope admin --minutes 60
//! ```
//!
//! Reads the secret from `AUTH_JWT_SECRET` (never from the command line, which other users of
//! the machine can see), and `AUTH_JWT_ISSUER` / `AUTH_JWT_AUDIENCE` if set. Prints the token.

use std::process::ExitCode;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

fn main() -> ExitCode {
    let mut sub = None;
    let mut scope = None;
    let mut minutes: u64 = 60;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--sub", Some(v)) => sub = Some(v),
            ("--scope", Some(v)) => scope = Some(v),
            ("--minutes", Some(v)) => match v.parse() {
                Ok(n) => minutes = n,
                Err(_) => return usage("--minutes wants a number"),
            },
            _ => return usage(&format!("unexpected argument {arg}")),
        }
    }
    let (Some(sub), Some(scope)) = (sub, scope) else { return usage("--sub and --scope are required") };
    let Ok(secret) = std::env::var("AUTH_JWT_SECRET") else { return usage("set AUTH_JWT_SECRET") };
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = json!({ "sub": sub, "scope": scope, "iat": now, "exp": now + minutes * 60 });
    for (claim, var) in [("iss", "AUTH_JWT_ISSUER"), ("aud", "AUTH_JWT_AUDIENCE")] {
        if let Ok(value) = std::env::var(var) {
            claims[claim] = json!(value);
        }
    }
    match encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => usage(&error.to_string()),
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!(
        "mint_token: {problem}\nusage: AUTH_JWT_SECRET=... mint_token --sub ID --scope 'orders|admin' [--minutes N]"
    );
    ExitCode::from(2)
}
