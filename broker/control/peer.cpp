#include "broker/control/peer.hpp"

#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/basic_stream.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <boost/json/parse.hpp>

#include "broker/core/errc.hpp"

namespace broker {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using Stream = beast::basic_stream<asio::local::stream_protocol, asio::any_io_executor>;

namespace {

constexpr std::uint64_t kMaxReplyBody = 1u << 20;

Error peer_error(const std::string& socket, const std::string& what, boost::system::error_code ec) {
  const bool late = ec == beast::error::timeout;
  return Error(make_error_code(late ? errc::qemu_timeout : errc::invalid_argument),
               "the broker at " + socket + ": " + what + ": " + (late ? "timed out" : ec.message()));
}

}  // namespace

asio::awaitable<Result<PeerReply>> peer_request(asio::any_io_executor ex, std::string socket,
                                                std::string method, std::string target,
                                                std::string body,
                                                std::chrono::milliseconds timeout) {
  Stream stream(ex);
  stream.expires_after(timeout);
  boost::system::error_code ec;
  asio::local::stream_protocol::endpoint where(socket);
  co_await stream.async_connect(where, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return peer_error(socket, "connect", ec);
  http::request<http::string_body> req(method == "POST" ? http::verb::post : http::verb::get,
                                       target, 11);
  req.set(http::field::host, "localhost");
  if (!body.empty()) {
    req.set(http::field::content_type, "application/json");
    req.body() = std::move(body);
  }
  req.prepare_payload();
  co_await http::async_write(stream, req, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return peer_error(socket, "write", ec);
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(kMaxReplyBody);
  co_await http::async_read(stream, buffer, parser, asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return peer_error(socket, "read", ec);
  PeerReply reply;
  reply.status = parser.get().result_int();
  boost::system::error_code parse_ec;
  auto parsed = boost::json::parse(parser.get().body(), parse_ec);
  if (!parse_ec) reply.body = std::move(parsed);
  stream.socket().shutdown(asio::local::stream_protocol::socket::shutdown_both, ec);
  co_return reply;
}

}  // namespace broker
