// TlsChannel (broker/control/tls_channel.hpp): the TLS of the link between two brokers, over a
// loopback TCP connection, with certificates made by openssl.
#include "broker/control/tls_channel.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <catch2/catch.hpp>
#include <memory>
#include <optional>
#include <string>

#include "broker/control/migration_link.hpp"
#include "support/support.hpp"

namespace asio = boost::asio;
using asio::awaitable;
using asio::ip::tcp;
using boost::system::error_code;
using broker::TlsChannel;

namespace {

constexpr auto kAwait = asio::as_tuple(asio::use_awaitable);

// Both ends of one loopback connection, and each side's TLS context.
struct Pair {
  asio::io_context io;
  qbtest::TempDir dir;
  qbtest::TestCerts certs{dir, "site"};
  std::shared_ptr<asio::ssl::context> server_ctx, client_ctx;
  std::optional<tcp::socket> server, client;

  Pair() {
    broker::MigrationTransport t{certs.cert, certs.key, certs.ca, false};
    auto s = broker::make_tls_context(t, true);
    auto c = broker::make_tls_context(t, false);
    REQUIRE(s);
    REQUIRE(c);
    server_ctx = *s;
    client_ctx = *c;
    tcp::acceptor acceptor(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    client.emplace(io);
    client->connect(acceptor.local_endpoint());
    server.emplace(acceptor.accept());
  }
  // Runs both coroutines to their end.
  void run(awaitable<void> a, awaitable<void> b) {
    asio::co_spawn(io, std::move(a), asio::detached);
    asio::co_spawn(io, std::move(b), asio::detached);
    io.run();
    io.restart();
  }
  // A channel on each end, after their handshake; the client checks the server against `host`.
  struct Channels {
    std::unique_ptr<TlsChannel> server, client;
    error_code server_shake, client_shake;
  };
  Channels shake_hands(const std::string& host);
};

std::string pattern(std::size_t n, unsigned seed) {
  std::string s(n, '\0');
  unsigned x = seed;
  for (auto& c : s) {
    x = x * 1103515245u + 12345u;
    c = static_cast<char>(x >> 16);
  }
  return s;
}

awaitable<void> shake(TlsChannel& ch, tcp::socket& s, error_code& out) {
  out = co_await ch.handshake(s);
}

Pair::Channels Pair::shake_hands(const std::string& host) {
  Channels c;
  c.server = std::make_unique<TlsChannel>(server_ctx->native_handle(), TlsChannel::Role::server);
  c.client =
      std::make_unique<TlsChannel>(client_ctx->native_handle(), TlsChannel::Role::client, host);
  run(shake(*c.server, *server, c.server_shake), shake(*c.client, *client, c.client_shake));
  return c;
}

awaitable<void> send(TlsChannel& ch, tcp::socket& s, const std::string& bytes, error_code& out) {
  out = co_await ch.write_all(s, asio::buffer(bytes));
}

// Reads until `want` bytes came, or an error.
awaitable<void> receive(TlsChannel& ch, tcp::socket& s, std::size_t want, std::string& got,
                        error_code& out) {
  std::string buf(100'000, '\0');  // not a multiple of a record
  while (got.size() < want) {
    auto [ec, n] = co_await ch.read_some(s, asio::buffer(buf));
    if (ec) {
      out = ec;
      co_return;
    }
    got.append(buf.data(), n);
  }
}

// Sends `bytes`, then reads `want` bytes back, on one side.
awaitable<void> send_then_receive(TlsChannel& ch, tcp::socket& s, const std::string& bytes,
                                  std::size_t want, std::string& got, error_code& sent,
                                  error_code& received) {
  sent = co_await ch.write_all(s, asio::buffer(bytes));
  co_await receive(ch, s, want, got, received);
}

}  // namespace

TEST_CASE("a TLS channel carries bytes each way byte for byte, while both directions run",
          "[control][tls]") {
  Pair p;
  auto c = p.shake_hands("127.0.0.1");
  REQUIRE_FALSE(c.server_shake);
  REQUIRE_FALSE(c.client_shake);
  TlsChannel& server = *c.server;
  TlsChannel& client = *c.client;

  // More than the receive buffer and than a write's chunk, each way at once.
  const std::string up = pattern((3u << 20) + 12345, 1);
  const std::string down = pattern((1u << 20) + 777, 2);
  std::string at_server, at_client;
  error_code up_sent, up_got, down_sent, down_got;
  p.run(send_then_receive(client, *p.client, up, down.size(), at_client, up_sent, down_got),
        send_then_receive(server, *p.server, down, up.size(), at_server, down_sent, up_got));
  CHECK_FALSE(up_sent);
  CHECK_FALSE(down_sent);
  CHECK_FALSE(up_got);
  CHECK_FALSE(down_got);
  CHECK(at_server == up);
  CHECK(at_client == down);
}

TEST_CASE("a TLS client refuses a server whose certificate is for another host", "[control][tls]") {
  Pair p;
  auto c = p.shake_hands("192.0.2.1");
  REQUIRE(c.client_shake);
  CHECK(c.client_shake.category() == asio::error::get_ssl_category());
  CHECK(c.client_shake.message().find("certificate verify failed") != std::string::npos);
  // The server learns of it from the client's alert.
  CHECK(c.server_shake);
}

TEST_CASE("a TLS channel whose peer closes without a close_notify reads as truncated",
          "[control][tls]") {
  Pair p;
  auto c = p.shake_hands("localhost");
  REQUIRE_FALSE(c.server_shake);
  REQUIRE_FALSE(c.client_shake);
  const std::string some = pattern(5000, 3);
  error_code sent;
  p.run(send(*c.client, *p.client, some, sent), [&]() -> awaitable<void> { co_return; }());
  REQUIRE_FALSE(sent);
  p.client->shutdown(tcp::socket::shutdown_send);
  std::string got;
  error_code ended;
  p.run(receive(*c.server, *p.server, some.size() + 1, got, ended),
        [&]() -> awaitable<void> { co_return; }());
  CHECK(got == some);
  CHECK(ended == asio::ssl::error::stream_truncated);
}

TEST_CASE("a TLS server refuses bytes that are not TLS", "[control][tls]") {
  Pair p;
  TlsChannel server(p.server_ctx->native_handle(), TlsChannel::Role::server);
  const std::string junk = "GET / HTTP/1.1\r\nHost: x\r\n\r\n" + pattern(4000, 4);
  asio::write(*p.client, asio::buffer(junk));
  error_code server_shake;
  p.run(shake(server, *p.server, server_shake), [&]() -> awaitable<void> { co_return; }());
  REQUIRE(server_shake);
  CHECK(server_shake.category() == asio::error::get_ssl_category());
}
