//! A small blocking HTTP/1.1 client, enough for the management API: one request per
//! connection (`Connection: close`), basic auth, bodies with a content length, and
//! responses framed by content length, chunked transfer coding or the end of the
//! connection. Only `http://`: https would need a TLS client, which this tool does
//! not carry. Everything read from the network is bounded, in size (the head and the
//! body) and in time (one deadline per request, connecting included).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The largest response body accepted.
pub const MAX_BODY: usize = 256 * 1024 * 1024;
/// The largest response head (status line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Interim (1xx) responses skipped before giving up.
const MAX_INTERIM: usize = 8;

/// Where the API is: `http://HOST[:PORT][/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The host as written, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
    /// A path prefix (for an API behind a proxy), without a trailing slash.
    pub prefix: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let lower = url.to_ascii_lowercase();
        let rest = if lower.starts_with("http://") {
            &url["http://".len()..]
        } else if lower.starts_with("https://") {
            return Err(format!(
                "{url}: https is not supported: warrenmqctl speaks plain http:// only \
                 (reach a TLS-only API through a local TLS proxy or an SSH tunnel)"
            ));
        } else {
            return Err(format!(
                "{url}: not an http:// URL (expected http://HOST:PORT, e.g. http://127.0.0.1:15672)"
            ));
        };
        if rest.contains(['?', '#']) {
            return Err(format!(
                "{url}: a query or fragment has no place in the API's URL"
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!(
                "{url}: credentials go in --user and --password (or WARRENMQCTL_USER and \
                 WARRENMQCTL_PASSWORD), not in the URL"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((host, after)) = v6.split_once(']') else {
                return Err(format!("{url}: unclosed '[' in the host"));
            };
            match after {
                "" => (host, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(format!("{url}: unexpected '{p}' after the host")),
                },
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url}: bad port '{p}'"))?,
        };
        Ok(Endpoint {
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }

    /// The Host header's value.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Percent-encodes one path segment: everything but RFC 3986's unreserved
/// characters, so that "/" (the default vhost) becomes %2F.
pub fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug)]
pub enum Error {
    /// No connection could be made (name resolution, refusal, connect timeout).
    Connect(String),
    /// Connected, but the answer did not come before the deadline.
    Timeout,
    /// The peer's answer is not HTTP as this client reads it, or is too large.
    Protocol(String),
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The status line's reason phrase.
    pub phrase: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct Client {
    pub endpoint: Endpoint,
    authorization: String,
    pub timeout: Duration,
    pub max_body: usize,
}

impl Client {
    pub fn new(endpoint: Endpoint, user: &str, password: &str, timeout: Duration) -> Client {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Client {
            endpoint,
            authorization: format!("Basic {token}"),
            timeout,
            max_body: MAX_BODY,
        }
    }

    /// One request; `path` is already percent-encoded and starts with '/'. A body
    /// is sent as JSON.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<Response, Error> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = self.connect(deadline)?;
        let mut head = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: warrenmqctl/{}\r\n\
             Accept: application/json\r\nAuthorization: {}\r\nConnection: close\r\n",
            self.endpoint.prefix,
            self.endpoint.authority(),
            env!("CARGO_PKG_VERSION"),
            self.authorization,
        );
        for (name, value) in headers {
            // A header value cannot carry a line break: it would end the header.
            let value: String = value
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        } else if method != "GET" && method != "HEAD" {
            head.push_str("Content-Length: 0\r\n");
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body.unwrap_or_default());
        set_deadline(&stream, deadline, false)?;
        stream.write_all(&request).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::Timeout,
            _ => Error::Protocol(format!("sending the request: {e}")),
        })?;
        let mut reader = Reader {
            stream,
            buf: Vec::new(),
            pos: 0,
            deadline,
        };
        read_response(&mut reader, method == "HEAD", self.max_body)
    }

    fn connect(&self, deadline: Instant) -> Result<TcpStream, Error> {
        let e = &self.endpoint;
        let addrs: Vec<SocketAddr> = (e.host.as_str(), e.port)
            .to_socket_addrs()
            .map_err(|err| Error::Connect(format!("cannot resolve '{}': {err}", e.host)))?
            .collect();
        let mut last = format!("'{}' resolves to no address", e.host);
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Connect(format!(
                    "connection timed out after {} s",
                    self.timeout.as_secs_f64()
                )));
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(err) if matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                    last = format!("connection to {addr} timed out");
                }
                Err(err) => last = format!("{err}"),
            }
        }
        Err(Error::Connect(last))
    }
}

/// Applies the time left to the socket's reads or writes.
fn set_deadline(stream: &TcpStream, deadline: Instant, read: bool) -> Result<(), Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Timeout);
    }
    let set = if read {
        stream.set_read_timeout(Some(left))
    } else {
        stream.set_write_timeout(Some(left))
    };
    set.map_err(|e| Error::Protocol(format!("socket: {e}")))
}

/// Buffered reads from the connection, each within the request's deadline.
struct Reader {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    deadline: Instant,
}

impl Reader {
    /// Reads more bytes into the buffer; false at the end of the stream.
    fn fill(&mut self) -> Result<bool, Error> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut chunk = [0u8; 64 * 1024];
        loop {
            set_deadline(&self.stream, self.deadline, true)?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(Error::Timeout)
                }
                Err(e) => return Err(Error::Protocol(format!("reading the response: {e}"))),
            }
        }
    }

    /// One line without its CRLF (or bare LF), at most `limit` bytes; None at the
    /// end of the stream before any byte of it.
    fn line(&mut self, limit: usize) -> Result<Option<Vec<u8>>, Error> {
        let mut scanned = self.pos;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|b| *b == b'\n') {
                let end = scanned + i;
                let mut line = self.buf[self.pos..end].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.pos = end + 1;
                return Ok(Some(line));
            }
            if self.buf.len() - self.pos > limit {
                return Err(Error::Protocol(format!(
                    "a line of the response is longer than {limit} bytes"
                )));
            }
            scanned = self.buf.len();
            let before = self.pos;
            if !self.fill()? {
                if self.pos == self.buf.len() {
                    return Ok(None);
                }
                return Err(Error::Protocol("the connection closed mid-line".into()));
            }
            // fill() may have compacted the buffer.
            scanned -= before - self.pos;
        }
    }

    /// Exactly `n` bytes appended to `out`.
    fn exact(&mut self, mut n: usize, out: &mut Vec<u8>) -> Result<(), Error> {
        let total = n;
        while n > 0 {
            if self.pos == self.buf.len() && !self.fill()? {
                return Err(Error::Protocol(format!(
                    "the connection closed after {} of {total} announced bytes",
                    total - n
                )));
            }
            let take = n.min(self.buf.len() - self.pos);
            out.extend_from_slice(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
            n -= take;
        }
        Ok(())
    }

    /// Everything up to the end of the stream, at most `limit` bytes in `out`.
    fn until_end(&mut self, out: &mut Vec<u8>, limit: usize) -> Result<(), Error> {
        loop {
            out.extend_from_slice(&self.buf[self.pos..]);
            self.pos = self.buf.len();
            if out.len() > limit {
                return Err(too_large(limit));
            }
            if !self.fill()? {
                return Ok(());
            }
        }
    }
}

fn too_large(limit: usize) -> Error {
    Error::Protocol(format!(
        "the response is larger than {} MiB",
        limit / (1024 * 1024)
    ))
}

fn read_response(r: &mut Reader, head_only: bool, max_body: usize) -> Result<Response, Error> {
    for _ in 0..MAX_INTERIM {
        let (status, phrase, headers) = read_head(r)?;
        if (100..200).contains(&status) {
            if status == 101 {
                return Err(Error::Protocol("the server switched protocols".into()));
            }
            continue;
        }
        let mut resp = Response {
            status,
            phrase,
            headers,
            body: Vec::new(),
        };
        if head_only || status == 204 || status == 304 {
            return Ok(resp);
        }
        let chunked = resp
            .header("transfer-encoding")
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        if chunked {
            read_chunked(r, &mut resp.body, max_body)?;
        } else if let Some(n) = content_length(&resp.headers)? {
            if n > max_body {
                return Err(too_large(max_body));
            }
            r.exact(n, &mut resp.body)?;
        } else {
            r.until_end(&mut resp.body, max_body)?;
        }
        return Ok(resp);
    }
    Err(Error::Protocol(format!(
        "more than {MAX_INTERIM} interim responses"
    )))
}

type Head = (u16, String, Vec<(String, String)>);

fn read_head(r: &mut Reader) -> Result<Head, Error> {
    let mut used = 0;
    let mut next = |r: &mut Reader| -> Result<Option<String>, Error> {
        let line = r.line(MAX_HEAD)?;
        if let Some(l) = &line {
            used += l.len() + 2;
            if used > MAX_HEAD {
                return Err(Error::Protocol(format!(
                    "the response head is larger than {MAX_HEAD} bytes"
                )));
            }
        }
        Ok(line.map(|l| String::from_utf8_lossy(&l).into_owned()))
    };
    let Some(status_line) = next(r)? else {
        return Err(Error::Protocol(
            "the connection closed without an answer".into(),
        ));
    };
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let phrase = parts.next().unwrap_or_default().trim().to_string();
    if !version.starts_with("HTTP/1.") {
        return Err(Error::Protocol(format!(
            "not an HTTP/1.x answer: '{}'",
            printable(&status_line)
        )));
    }
    let status = code
        .parse::<u16>()
        .ok()
        .filter(|c| code.len() == 3 && (100..=999).contains(c))
        .ok_or_else(|| Error::Protocol(format!("bad status line '{}'", printable(&status_line))))?;
    let mut headers = Vec::new();
    loop {
        let Some(line) = next(r)? else {
            return Err(Error::Protocol(
                "the connection closed within the response head".into(),
            ));
        };
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    Ok((status, phrase, headers))
}

fn content_length(headers: &[(String, String)]) -> Result<Option<usize>, Error> {
    let mut found: Option<usize> = None;
    for (name, value) in headers {
        if name != "content-length" {
            continue;
        }
        for v in value.split(',') {
            let n = v.trim().parse::<usize>().map_err(|_| {
                Error::Protocol(format!("bad Content-Length '{}'", printable(value)))
            })?;
            if found.is_some_and(|f| f != n) {
                return Err(Error::Protocol("conflicting Content-Length headers".into()));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

fn read_chunked(r: &mut Reader, out: &mut Vec<u8>, max_body: usize) -> Result<(), Error> {
    loop {
        let Some(line) = r.line(4096)? else {
            return Err(Error::Protocol(
                "the connection closed before the last chunk".into(),
            ));
        };
        let line = String::from_utf8_lossy(&line);
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .ok()
            .filter(|_| !size.is_empty() && !size.starts_with('+'))
            .ok_or_else(|| Error::Protocol(format!("bad chunk size '{}'", printable(&line))))?;
        if size == 0 {
            // Trailers, up to the empty line; a peer that closes instead is forgiven.
            let mut trailers = 0;
            while let Some(t) = r.line(4096)? {
                if t.is_empty() {
                    break;
                }
                trailers += t.len();
                if trailers > MAX_HEAD {
                    return Err(Error::Protocol("too many trailers".into()));
                }
            }
            return Ok(());
        }
        if out.len().saturating_add(size) > max_body {
            return Err(too_large(max_body));
        }
        r.exact(size, out)?;
        match r.line(2)? {
            Some(l) if l.is_empty() => {}
            _ => return Err(Error::Protocol("a chunk does not end with CRLF".into())),
        }
    }
}

/// A peer's text, shortened and stripped of control characters, for a message.
fn printable(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(80)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn segments_are_encoded_but_for_unreserved_characters() {
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(
            encode("127.0.0.1:5 -> 1.2.3.4:5672"),
            "127.0.0.1%3A5%20-%3E%201.2.3.4%3A5672"
        );
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn urls_are_read_or_refused_with_a_reason() {
        let e = Endpoint::parse("http://127.0.0.1:15672").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.prefix.as_str()),
            ("127.0.0.1", 15672, "")
        );
        let e = Endpoint::parse("HTTP://[::1]:8080/rabbit/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.prefix.as_str()),
            ("::1", 8080, "/rabbit")
        );
        assert_eq!(e.authority(), "[::1]:8080");
        assert_eq!(Endpoint::parse("http://broker").unwrap().port, 80);
        for (bad, why) in [
            ("https://h:15671", "https is not supported"),
            ("h:15672", "not an http:// URL"),
            ("http://u:p@h:1", "credentials go in"),
            ("http://h:99999", "bad port"),
            ("http://:15672", "no host"),
            ("http://[::1", "unclosed"),
        ] {
            let err = Endpoint::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    /// Serves `reply` to one request and returns the client's answer.
    fn exchange(reply: &'static [u8], max_body: usize) -> Result<Response, Error> {
        exchange_in(reply, max_body, 7, Duration::ZERO)
    }

    /// As `exchange`, written `piece` bytes at a time with `pause` between pieces.
    fn exchange_in(
        reply: &'static [u8],
        max_body: usize,
        piece: usize,
        pause: Duration,
    ) -> Result<Response, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut b).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&b[..n]);
            }
            // Written in pieces, so that the reader meets every boundary.
            for bytes in reply.chunks(piece) {
                if s.write_all(bytes).is_err() {
                    break;
                }
                std::thread::sleep(pause);
            }
            String::from_utf8(req).unwrap()
        });
        let endpoint = Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let mut client = Client::new(endpoint, "guest", "guest", Duration::from_secs(5));
        client.max_body = max_body;
        let r = client.send("GET", "/api/queues/%2F", None, &[]);
        let req = server.join().unwrap();
        assert!(req.starts_with("GET /api/queues/%2F HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains("Authorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n"),
            "{req}"
        );
        assert!(req.contains("Connection: close\r\n"), "{req}");
        r
    }

    #[test]
    fn bodies_are_read_by_length_chunks_or_close() {
        let r = exchange(
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n[1,2]extra",
            100,
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"[1,2"[..]));
        let r = exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\n[1,\r\n2\r\n2]\r\n0\r\nX-T: y\r\n\r\n",
            100,
        )
        .unwrap();
        assert_eq!(r.body, b"[1,2]");
        // One byte per read: every line and chunk boundary falls between two reads.
        let r = exchange_in(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n",
            100,
            1,
            Duration::from_millis(1),
        )
        .unwrap();
        assert_eq!(r.body, b"[1,2]");
        let r = exchange(b"HTTP/1.0 404 Not Found\r\n\r\n{\"reason\":\"x\"}", 100).unwrap();
        assert_eq!((r.status, r.phrase.as_str()), (404, "Not Found"));
        assert_eq!(r.body, b"{\"reason\":\"x\"}");
        let r = exchange(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            100,
        )
        .unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
    }

    #[test]
    fn oversized_or_malformed_answers_are_errors() {
        for (reply, why) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 101\r\n\r\n"[..],
                "larger than",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n65\r\n",
                "larger than",
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", ""),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x answer"),
            (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
                "closed after 3 of 10",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "bad chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                "conflicting",
            ),
            (b"", "closed without an answer"),
        ] {
            match exchange(reply, 100) {
                Err(Error::Protocol(m)) => assert!(m.contains(why), "{m}"),
                Ok(r) if why.is_empty() => assert!(r.body.is_empty()),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(reply)),
            }
        }
        let big: &'static [u8] = Box::leak(
            [&b"HTTP/1.1 200 OK\r\n\r\n"[..], &[b'x'; 200][..]]
                .concat()
                .into_boxed_slice(),
        );
        assert!(matches!(exchange(big, 100), Err(Error::Protocol(m)) if m.contains("larger")));
    }

    #[test]
    fn a_silent_server_times_out_and_a_closed_port_is_unreachable() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint =
            Endpoint::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let client = Client::new(endpoint, "u", "p", Duration::from_millis(300));
        let started = Instant::now();
        assert!(matches!(
            client.send("GET", "/api/overview", None, &[]),
            Err(Error::Timeout)
        ));
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(listener);
        assert!(matches!(
            client.send("GET", "/api/overview", None, &[]),
            Err(Error::Connect(_))
        ));
    }
}
