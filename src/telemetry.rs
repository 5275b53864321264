//! Logging and traces. Logs go to stderr as text or JSON, filtered by `RUST_LOG`. Every span
//! (a request, a saga's task, a step attempt) is also an OpenTelemetry span: the trace of a
//! client's W3C `traceparent` is continued, and in JSON each line written inside a trace carries
//! its `trace_id`. With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are exported in batches over
//! OTLP/HTTP (protobuf); unset, none are recorded, and the spans only carry the ids.

use std::future::Future;
use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::field::{Field, Visit};
use tracing::instrument::Instrumented;
use tracing::{Event, Instrument, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The span field that holds a trace's id on the spans that start a unit of work (a request, a
/// saga's task): JSON log lines copy it to the top level.
pub const TRACE_ID_FIELD: &str = "trace_id";

/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where traces go.
#[derive(Debug, Clone, Default)]
pub struct TraceSettings {
    /// The OTLP/HTTP collector's base URL (`http://host:4318`); `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute of exported spans.
    pub service_name: String,
}

/// The installed tracing pipeline; [`Telemetry::shutdown`] flushes what is still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports every finished span still buffered; blocks until done or timed out. Call it off
    /// the async runtime's threads (`spawn_blocking`), whose tasks do the export.
    pub fn flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            eprintln!("order-saga: could not export traces: {error}");
        }
    }

    /// Flushes and stops the exporter. Blocks like [`Telemetry::flush`].
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("order-saga: could not export traces: {error}");
        }
    }
}

/// Installs the global subscriber: the log format, and the OpenTelemetry layer that gives
/// every span its trace. Call once, from `main`, inside the Tokio runtime (the exporter's
/// requests run on it). Fails on an unusable endpoint or a second call.
pub fn init(format: LogFormat, filter: &str, traces: &TraceSettings) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = provider(traces)?;
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("order-saga"))
        // Each of these costs work on every span or every poll of an instrumented future.
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer(format))
        .with(otel)
        .with(TraceIds)
        .try_init()
        .map_err(|error| format!("cannot install the log subscriber: {error}"))?;
    Ok(Telemetry { provider })
}

/// The tracer provider: batches to the OTLP endpoint if there is one; without one it samples
/// nothing, so that spans get their ids (for the logs and `traceparent`) but record nothing.
fn provider(traces: &TraceSettings) -> Result<SdkTracerProvider, String> {
    let Some(endpoint) = traces.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
        return Ok(SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOff).build());
    };
    if !endpoint.starts_with("http://") {
        return Err(format!(
            "OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// URL (OTLP/HTTP without TLS, such as a local \
             collector on http://127.0.0.1:4318), not {endpoint:?}"
        ));
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| "telemetry::init needs a Tokio runtime")?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpHttp { runtime })
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|error| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {error}"))?;
    let resource = Resource::builder().with_service_name(traces.service_name.clone()).build();
    Ok(SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

/// Text lines as tracing writes them (span fields, the trace id among them, in the prefix), or
/// JSON objects with the trace id copied to the top level.
fn fmt_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    // Colours only on a terminal: the text layer formats every span's fields when the span is
    // made, and escape codes there cost on every request and step for nobody to see.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().event_format(WithTraceId(tracing_subscriber::fmt::format().json())).boxed(),
    }
}

/// Continues the trace of the request's `traceparent` header in `span`, if it holds a valid
/// one (anything else starts a new trace, never an error), and records the trace id in the
/// span's `trace_id` field.
pub fn continue_trace(span: &Span, headers: &HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    record_trace_id(span);
}

/// Records the trace id of `span` in its `trace_id` field (which the span must declare).
pub fn record_trace_id(span: &Span) {
    let context = span.context();
    let trace = context.span().span_context().trace_id();
    if trace != opentelemetry::trace::TraceId::INVALID {
        span.record(TRACE_ID_FIELD, tracing::field::display(trace));
    }
}

/// `tokio::spawn`, with the task in the current span: what it does belongs to the trace of
/// whatever spawned it.
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(future.in_current_span())
}

/// `future`, run inside `span`.
pub fn within<F: Future>(span: Span, future: F) -> Instrumented<F> {
    future.instrument(span)
}

/// Adds the `traceparent` of `span` to `headers`.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// A span's trace id, as recorded in its `trace_id` field, kept for the JSON formatter.
struct TraceIdOf(String);

/// Keeps the `trace_id` field recorded on a span as an extension of it, where the JSON
/// formatter finds it cheaply for every line written inside the span.
struct TraceIds;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for TraceIds {
    fn on_record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>, ctx: Context<'_, S>) {
        let mut visitor = TraceIdVisitor(None);
        values.record(&mut visitor);
        if let (Some(trace), Some(span)) = (visitor.0, ctx.span(id)) {
            span.extensions_mut().replace(TraceIdOf(trace));
        }
    }
}

/// Picks the `trace_id` field out of a record.
struct TraceIdVisitor(Option<String>);

impl Visit for TraceIdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == TRACE_ID_FIELD {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == TRACE_ID_FIELD {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// A JSON event format that writes `"trace_id"` first in every line emitted inside a span
/// that carries one (the nearest), and the line as the inner format writes it otherwise.
struct WithTraceId<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let trace = ctx.event_scope().and_then(|scope| {
            scope.into_iter().find_map(|span| span.extensions().get::<TraceIdOf>().map(|t| t.0.clone()))
        });
        let Some(trace) = trace else { return self.0.format_event(ctx, writer, event) };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                write!(writer, "{{\"{TRACE_ID_FIELD}\":\"{trace}\",")?;
                writer.write_str(rest)
            }
            None => writer.write_str(&line),
        }
    }
}

/// The exporter's HTTP client: one HTTP/1.1 request per export on a new connection, run as a
/// task of the service's Tokio runtime. The SDK's batch processor exports from a thread of
/// its own, with no runtime; a plain `http://` endpoint (a local collector or agent) is the
/// case this serves, so it needs no TLS stack or client pool.
#[derive(Debug)]
struct OtlpHttp {
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let task = self.runtime.spawn(async move {
            match tokio::time::timeout(EXPORT_TIMEOUT, post(request)).await {
                Ok(result) => result,
                Err(_) => Err(HttpError::from("the OTLP export timed out")),
            }
        });
        task.await?
    }
}

/// Sends `request` to its `http://` URI and reads the whole answer.
async fn post(request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
    let authority = request.uri().authority().ok_or("the OTLP endpoint has no host")?.clone();
    let stream = tokio::net::TcpStream::connect((authority.host(), authority.port_u16().unwrap_or(80))).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let (mut parts, body) = request.into_parts();
    // An HTTP/1.1 request names its path alone and the host in its own header.
    parts.headers.insert(axum::http::header::HOST, authority.as_str().parse()?);
    parts.uri = parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse()?;
    let response = sender.send_request(Request::from_parts(parts, Full::new(body))).await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, 4 << 20).collect().await?.to_bytes();
    Ok(Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without context activation (which would cost on every poll), a span's trace still
    /// follows its tracing parent.
    #[test]
    fn children_share_the_trace() {
        let provider = SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOn).build();
        let otel = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("t"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false);
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("info"))
            .with(fmt_layer(LogFormat::Json))
            .with(otel)
            .with(TraceIds);
        tracing::subscriber::with_default(subscriber, || {
            let parent = tracing::info_span!("parent", trace_id = tracing::field::Empty);
            record_trace_id(&parent);
            let _g = parent.enter();
            tracing::info!("inside");
            let child = tracing::info_span!("child");
            let a = parent.context().span().span_context().trace_id();
            let b = child.context().span().span_context().trace_id();
            assert_eq!(a, b);
        });
    }
}
