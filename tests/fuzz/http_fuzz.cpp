// Fuzz target for the control API's front half: bytes from a local client, as the Beast session
// reads them, into the pure router, request validation, the error map and render. No socket, no
// Broker, no QEMU.
//
// Input: the bytes of one or more pipelined HTTP/1.1 requests. Each is read with the server's
// limits (ServerLimits: header and body size), as broker/api/server.cpp reads it; a request that
// cannot be read is answered the way the server answers it, and ends the connection.
//
// Invariants checked (a violation aborts):
//  - a request read whole has a header within max_header_bytes and a body within max_body_bytes;
//    a Content-Length over max_body_bytes is refused (413) before the body is read;
//  - every refusal, whether of the framing or of the route, maps to a 4xx or 5xx status with a
//    stable code name (lowercase letters, digits and '_', or an errno name), and renders as a
//    JSON error body that names the same code;
//  - a 405 names the methods the path does take (the server's Allow header);
//  - a body the router accepts nests no deeper than its limit (64).
#include <boost/beast/core/buffers_prefix.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <algorithm>
#include <boost/json/parse.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "broker/api/errc.hpp"
#include "broker/api/http_errors.hpp"
#include "broker/api/router.hpp"
#include "broker/api/server.hpp"

namespace {

namespace api = broker::api;
namespace http = boost::beast::http;
namespace json = boost::json;

void check(bool ok) {
  if (!ok) std::abort();
}

bool stable_code(std::string_view code) {
  if (code.empty()) return false;
  for (char c : code) {
    bool lower = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
    bool errno_name = (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    if (!lower && !errno_name) return false;
  }
  return true;
}

bool valid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    std::size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (std::size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

// The refusal as the client sees it: status, body and the code it names.
void check_refusal(const broker::Error& e, std::string_view target,
                   std::optional<http::status> expected = std::nullopt) {
  auto cls = api::classify(e.code);
  check(stable_code(cls.code));
  api::Outcome out = api::failure(e);
  auto status = static_cast<unsigned>(out.status);
  check(status >= 400 && status <= 599);
  check(out.status == cls.status);
  if (expected) check(out.status == *expected);
  if (out.status == http::status::method_not_allowed) {
    check(!api::allowed_methods(target).empty());
  }
  auto res = api::render(out, 11, false);
  check(res.result() == out.status);
  check(valid_utf8(res.body()));
  boost::system::error_code ec;
  json::value body = json::parse(res.body(), ec);
  // An error quoting bytes that are not UTF-8 (DELETE /v1/domains/vm1?%ce=1, a fuzz finding) is
  // still a JSON body.
  check(!ec);
  const auto* err = body.is_object() ? body.get_object().if_contains("error") : nullptr;
  check(err != nullptr && err->is_object());
  const auto* code = err->get_object().if_contains("code");
  check(code != nullptr && code->is_string() && code->get_string() == cls.code);
}

// json_body.cpp parse_json_body: bodies nest at most this deep.
constexpr std::size_t kRouterMaxDepth = 64;

// How deep `body` nests, read with a far larger limit than the router's; 0 when it is not JSON.
std::size_t body_depth(std::string_view body) {
  json::parse_options opts;
  opts.max_depth = 4096;
  boost::system::error_code ec;
  json::value v = json::parse(body, ec, json::storage_ptr(), opts);
  if (ec) return 0;
  std::size_t deepest = 0;
  std::vector<std::pair<const json::value*, std::size_t>> todo{{&v, 0}};
  while (!todo.empty()) {
    auto [cur, d] = todo.back();
    todo.pop_back();
    if (const auto* a = cur->if_array()) {
      deepest = std::max(deepest, d + 1);
      for (const auto& e : *a) todo.emplace_back(&e, d + 1);
    } else if (const auto* o = cur->if_object()) {
      deepest = std::max(deepest, d + 1);
      for (const auto& kv : *o) todo.emplace_back(&kv.value(), d + 1);
    }
  }
  return deepest;
}

broker::Error api_error(api::errc code, std::string message) {
  return broker::Error(make_error_code(code), std::move(message));
}

// What the server answers for a request it could not read (server.cpp read_failure), or nothing
// when the peer is gone (end of stream, half a message).
void refuse_read(const boost::system::error_code& ec) {
  if (ec == http::error::header_limit) {
    check_refusal(api_error(api::errc::header_too_large, "header"), "/",
                  http::status::request_header_fields_too_large);
  } else if (ec == http::error::body_limit) {
    check_refusal(api_error(api::errc::body_too_large, "body"), "/",
                  http::status::payload_too_large);
  } else if (ec != http::error::end_of_stream && ec != http::error::partial_message) {
    check_refusal(api_error(api::errc::bad_request, "malformed HTTP request: " + ec.message()),
                  "/", http::status::bad_request);
  }
}

std::size_t content_length_over(const http::request_parser<http::string_body>& p) {
  auto cl = p.content_length();
  return cl ? static_cast<std::size_t>(*cl) : 0;
}

// One read: as much of `in` as the parser takes. The end of `in` is the peer closing: the end of
// a body read to EOF, or half a message.
std::size_t feed(http::request_parser<http::string_body>& parser, std::string_view& in,
                 boost::system::error_code& ec) {
  if (in.empty()) {
    parser.put_eof(ec);
    if (!ec && !parser.is_done()) ec = http::error::partial_message;
    return 0;
  }
  std::size_t used = parser.put(boost::asio::buffer(in.data(), in.size()), ec);
  in.remove_prefix(used);
  if (ec == http::error::need_more) ec = {};
  // Beast takes no part of a header it cannot finish: everything left is that part.
  if (!ec && used == 0) in = {};
  return used;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const api::ServerLimits limits;
  std::string_view in(reinterpret_cast<const char*>(data), size);
  // A keep-alive connection: requests one after another until one cannot be read.
  for (int requests = 0; requests < 8 && !in.empty(); ++requests) {
    http::request_parser<http::string_body> parser;
    parser.header_limit(static_cast<std::uint32_t>(limits.max_header_bytes));
    parser.body_limit(limits.max_body_bytes);
    boost::system::error_code ec;
    std::size_t header_bytes = 0;
    // The header alone first, to measure it, then the body.
    while (!ec && !parser.is_header_done()) header_bytes += feed(parser, in, ec);
    parser.eager(true);
    while (!ec && !parser.is_done()) feed(parser, in, ec);
    if (parser.is_header_done()) {
      // Beast refuses a declared length over the limit as soon as the header is read.
      if (content_length_over(parser) > limits.max_body_bytes) {
        check(ec == http::error::body_limit);
      }
    }
    if (ec) {
      refuse_read(ec);
      return 0;
    }
    if (!parser.is_done()) return 0;
    check(header_bytes <= limits.max_header_bytes);
    auto req = parser.release();
    check(req.body().size() <= limits.max_body_bytes);

    // As the server routes it, its Content-Type included; then its body taken as JSON whatever
    // it was declared, so that inputs without a Content-Type still reach the validators.
    if (auto whole = api::route(req); !whole) check_refusal(whole.error(), req.target());
    auto cmd = api::route(req.method(), req.target(), req.body());
    if (!cmd) {
      check_refusal(cmd.error(), req.target());
      continue;
    }
    // A route that matched: its body, if any, was JSON within the router's depth limit.
    check(body_depth(req.body()) <= kRouterMaxDepth);
    if (std::holds_alternative<api::WatchEvents>(*cmd)) return 0;  // the stream takes the connection
    if (!req.keep_alive()) return 0;
  }
  return 0;
}
