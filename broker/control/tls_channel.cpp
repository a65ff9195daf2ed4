#include "broker/control/tls_channel.hpp"

#include <openssl/err.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <cstring>
#include <stdexcept>

namespace broker {
namespace asio = boost::asio;
using asio::awaitable;
using asio::ip::tcp;
using boost::system::error_code;

namespace {

constexpr auto kAwait = asio::as_tuple(asio::use_awaitable);
constexpr std::size_t kReceive = 256 * 1024;  // one read from the socket at most
constexpr std::size_t kWriteChunk = 1 << 20;  // plaintext per SSL_write, then a flush

}  // namespace

TlsChannel::TlsChannel(SSL_CTX* ctx, Role role, const std::string& host) : in_(kReceive) {
  ssl_ = ::SSL_new(ctx);
  BIO* bio = ssl_ != nullptr ? ::BIO_new(bio_method()) : nullptr;
  if (bio == nullptr) {
    ::SSL_free(ssl_);
    throw std::bad_alloc();
  }
  ::BIO_set_data(bio, this);
  ::BIO_set_init(bio, 1);
  ::SSL_set_bio(ssl_, bio, bio);  // one reference, owned by ssl_
  // OpenSSL takes whole records from the receive buffer in one call where it can.
  ::SSL_set_read_ahead(ssl_, 1);
  if (role == Role::server) {
    ::SSL_set_accept_state(ssl_);
    return;
  }
  ::SSL_set_connect_state(ssl_);
  X509_VERIFY_PARAM* param = ::SSL_get0_param(ssl_);
  ::X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
  error_code not_address;
  asio::ip::make_address(host, not_address);
  if (!not_address) {
    ::X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str());
  } else {
    ::X509_VERIFY_PARAM_set1_host(param, host.c_str(), host.size());
  }
}

TlsChannel::~TlsChannel() {
  ::SSL_free(ssl_);
}

BIO_METHOD* TlsChannel::bio_method() {
  static BIO_METHOD* const method = [] {
    BIO_METHOD* m = ::BIO_meth_new(::BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "qbroker-link");
    if (m == nullptr) throw std::bad_alloc();
    ::BIO_meth_set_read_ex(m, &TlsChannel::bio_read);
    ::BIO_meth_set_write_ex(m, &TlsChannel::bio_write);
    ::BIO_meth_set_ctrl(m, &TlsChannel::bio_ctrl);
    return m;
  }();
  return method;
}

int TlsChannel::bio_read(BIO* bio, char* data, std::size_t len, std::size_t* done) {
  auto* self = static_cast<TlsChannel*>(::BIO_get_data(bio));
  ::BIO_clear_retry_flags(bio);
  const std::size_t have = self->in_end_ - self->in_pos_;
  if (have == 0) {
    ::BIO_set_retry_read(bio);  // SSL_ERROR_WANT_READ: fill() and try again
    *done = 0;
    return 0;
  }
  const std::size_t n = std::min(have, len);
  std::memcpy(data, self->in_.data() + self->in_pos_, n);
  self->in_pos_ += n;
  *done = n;
  return 1;
}

int TlsChannel::bio_write(BIO* bio, const char* data, std::size_t len, std::size_t* done) {
  auto* self = static_cast<TlsChannel*>(::BIO_get_data(bio));
  ::BIO_clear_retry_flags(bio);
  self->out_.insert(self->out_.end(), data, data + len);
  *done = len;
  return 1;
}

long TlsChannel::bio_ctrl(BIO* bio, int cmd, long, void*) {
  auto* self = static_cast<TlsChannel*>(::BIO_get_data(bio));
  switch (cmd) {
    case BIO_CTRL_FLUSH:
      return 1;  // the next flush() sends
    case BIO_CTRL_PENDING:
      return static_cast<long>(self->in_end_ - self->in_pos_);
    case BIO_CTRL_WPENDING:
      return static_cast<long>(self->out_.size());
    default:
      return 0;
  }
}

error_code TlsChannel::failure(int ret) {
  const int kind = ::SSL_get_error(ssl_, ret);
  const unsigned long queued = ::ERR_get_error();
  ::ERR_clear_error();
  if (kind == SSL_ERROR_ZERO_RETURN) return asio::error::eof;
  if (kind == SSL_ERROR_SSL && queued != 0) {
    return error_code(static_cast<int>(queued), asio::error::get_ssl_category());
  }
  return asio::ssl::error::stream_truncated;
}

awaitable<error_code> TlsChannel::fill(tcp::socket& s) {
  if (in_pos_ == in_end_) {
    in_pos_ = in_end_ = 0;
  } else if (in_end_ == in_.size()) {
    std::memmove(in_.data(), in_.data() + in_pos_, in_end_ - in_pos_);
    in_end_ -= in_pos_;
    in_pos_ = 0;
  }
  // OpenSSL asks for more only once it has taken all there was, and a record is far smaller than
  // the buffer; a full buffer here would make the read below return nothing for ever.
  if (in_end_ == in_.size()) co_return asio::error::no_buffer_space;
  auto [ec, n] =
      co_await s.async_read_some(asio::buffer(in_.data() + in_end_, in_.size() - in_end_), kAwait);
  in_end_ += n;
  co_return ec;
}

awaitable<error_code> TlsChannel::flush(tcp::socket& s) {
  while (!out_.empty()) {
    sending_.swap(out_);
    auto [ec, n] = co_await asio::async_write(s, asio::buffer(sending_), kAwait);
    sending_.clear();
    if (ec) co_return ec;
  }
  co_return error_code{};
}

awaitable<error_code> TlsChannel::handshake(tcp::socket& s) {
  for (;;) {
    ::ERR_clear_error();
    const int r = ::SSL_do_handshake(ssl_);
    // Read before the flush: another link's OpenSSL calls may run on this thread meanwhile.
    const bool wants_input = r != 1 && ::SSL_get_error(ssl_, r) == SSL_ERROR_WANT_READ;
    const error_code failed = r == 1 || wants_input ? error_code{} : failure(r);
    // What OpenSSL wrote goes out first: the last flight, or an alert that says why it failed.
    const error_code sent = co_await flush(s);
    if (failed) co_return failed;
    if (sent || r == 1) co_return sent;
    const error_code got = co_await fill(s);
    if (got == asio::error::eof) co_return asio::ssl::error::stream_truncated;
    if (got) co_return got;
  }
}

awaitable<std::tuple<error_code, std::size_t>> TlsChannel::read_some(tcp::socket& s,
                                                                     asio::mutable_buffer b) {
  auto* at = static_cast<char*>(b.data());
  std::size_t got = 0;
  while (got < b.size()) {
    ::ERR_clear_error();
    std::size_t n = 0;
    const int r = ::SSL_read_ex(ssl_, at + got, b.size() - got, &n);
    if (r == 1) {
      got += n;
      continue;
    }
    if (got > 0) break;  // what came first; an error shows again on the next call
    if (::SSL_get_error(ssl_, r) != SSL_ERROR_WANT_READ) co_return std::tuple{failure(r), 0};
    const error_code ec = co_await fill(s);
    if (ec == asio::error::eof) co_return std::tuple{asio::ssl::error::stream_truncated, 0};
    if (ec) co_return std::tuple{ec, 0};
  }
  co_return std::tuple{error_code{}, got};
}

awaitable<error_code> TlsChannel::write_all(tcp::socket& s, asio::const_buffer b) {
  const auto* at = static_cast<const char*>(b.data());
  for (std::size_t left = b.size(); left > 0;) {
    ::ERR_clear_error();
    std::size_t n = 0;
    const int r = ::SSL_write_ex(ssl_, at, std::min(left, kWriteChunk), &n);
    if (r != 1) co_return failure(r);
    at += n;
    left -= n;
    if (auto ec = co_await flush(s)) co_return ec;
  }
  co_return co_await flush(s);
}

}  // namespace broker
