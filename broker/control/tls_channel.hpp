// TLS over a connected TCP socket for the link between two brokers (migration_link.hpp), driven
// through OpenSSL with buffers of the link's own in place of asio::ssl::stream.
//
// asio::ssl::stream moves every record through a 17 KiB BIO pair: one send or receive per 16 KiB
// record, and two copies more per byte than needed. This channel hands OpenSSL a BIO that reads
// from a 256 KiB receive buffer and appends to a send buffer, so a relay sends and receives once
// per 256 KiB and copies each byte only into and out of OpenSSL. bench/relay_bench measures both.
//
// One read and one write may be in flight at once (the link's contract), on one thread. Only a
// write sends: what a read makes OpenSSL say (a key update's answer) goes out with the next
// write.
#pragma once

#include <openssl/ssl.h>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/system/error_code.hpp>
#include <cstddef>
#include <string>
#include <tuple>
#include <vector>

namespace broker {

class TlsChannel {
 public:
  enum class Role { client, server };
  // `ctx` holds the certificates, the CA and the verify mode. A client checks the server's
  // certificate against `host`: a name, or an IP address as text.
  TlsChannel(SSL_CTX* ctx, Role role, const std::string& host = {});
  ~TlsChannel();
  TlsChannel(const TlsChannel&) = delete;
  TlsChannel& operator=(const TlsChannel&) = delete;

  // Errors are OpenSSL's, in asio's SSL category, as asio::ssl::stream reports them; a peer that
  // closes the connection without a close_notify is asio::ssl::error::stream_truncated.
  boost::asio::awaitable<boost::system::error_code> handshake(boost::asio::ip::tcp::socket& s);
  // At least one byte, or an error; as many as are decrypted already or arrive with one read.
  boost::asio::awaitable<std::tuple<boost::system::error_code, std::size_t>> read_some(
      boost::asio::ip::tcp::socket& s, boost::asio::mutable_buffer b);
  boost::asio::awaitable<boost::system::error_code> write_all(boost::asio::ip::tcp::socket& s,
                                                              boost::asio::const_buffer b);

 private:
  static int bio_read(BIO* bio, char* data, std::size_t len, std::size_t* done);
  static int bio_write(BIO* bio, const char* data, std::size_t len, std::size_t* done);
  static long bio_ctrl(BIO* bio, int cmd, long num, void* ptr);
  static BIO_METHOD* bio_method();

  boost::system::error_code failure(int ret);
  boost::asio::awaitable<boost::system::error_code> fill(boost::asio::ip::tcp::socket& s);
  boost::asio::awaitable<boost::system::error_code> flush(boost::asio::ip::tcp::socket& s);

  SSL* ssl_ = nullptr;
  std::vector<char> in_;  // received, not yet taken by OpenSSL: [in_pos_, in_end_)
  std::size_t in_pos_ = 0;
  std::size_t in_end_ = 0;
  std::vector<char> out_;      // OpenSSL's records, not yet sent
  std::vector<char> sending_;  // the records a flush is sending
};

}  // namespace broker
