// The xenstore wire codec (tests/fakes/xs_wire) with byte strings: no socket, no server.
#include "xs_wire.hpp"

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace xs = qbtest::xs;

TEST_CASE("xs_wire: a header is four u32 in host byte order", "[xen]") {
  const xs::Header h{xs::read, 0x01020304, 7, 5};
  const std::string bytes = xs::encode_header(h);
  REQUIRE(bytes.size() == xs::header_size);
  const std::uint32_t words_in[4] = {xs::read, 0x01020304, 7, 5};
  CHECK(std::memcmp(bytes.data(), words_in, sizeof(words_in)) == 0);
  const xs::Header back = xs::decode_header(bytes);
  CHECK(back.type == h.type);
  CHECK(back.req_id == h.req_id);
  CHECK(back.tx_id == h.tx_id);
  CHECK(back.len == h.len);
}

TEST_CASE("xs_wire: payloads split into NUL-terminated words", "[xen]") {
  using V = std::vector<std::string_view>;
  CHECK(xs::split_words(std::string("a\0bc\0", 5)) == V{"a", "bc"});
  CHECK(xs::split_words(std::string("\0", 1)) == V{""});
  CHECK(xs::split_words(std::string("a\0\0", 3)) == V{"a", ""});
  CHECK(xs::split_words("") == V{});
  CHECK_FALSE(xs::split_words(std::string("a\0b", 3)).has_value());
  CHECK(xs::join_words({"a", "bc"}) == std::string("a\0bc\0", 5));
}

TEST_CASE("xs_wire: replies echo the request, errors travel by name", "[xen]") {
  const xs::Header req{xs::write, 9, 4, 0};
  const std::string err = xs::encode_error(req, "ENOENT");
  const xs::Header eh = xs::decode_header(err);
  CHECK(eh.type == xs::error);
  CHECK(eh.req_id == 9);
  CHECK(eh.tx_id == 4);
  CHECK(err.substr(xs::header_size) == std::string("ENOENT\0", 7));
  const std::string ok = xs::encode_reply(req, std::string("OK\0", 3));
  CHECK(xs::decode_header(ok).type == xs::write);
  CHECK(xs::decode_header(ok).len == 3);
  const std::string ev = xs::encode_event("/a", "t");
  CHECK(xs::decode_header(ev).type == xs::watch_event);
  CHECK(ev.substr(xs::header_size) == std::string("/a\0t\0", 5));
  CHECK_NOTHROW(xs::encode(xs::read, 0, 0, std::string(xs::payload_max, 'x')));
  CHECK_THROWS(xs::encode(xs::read, 0, 0, std::string(xs::payload_max + 1, 'x')));
}

TEST_CASE("xs_wire: the decoder yields whole messages however the bytes arrive", "[xen]") {
  const std::string stream = xs::encode(xs::read, 1, 0, std::string("/a\0", 3)) +
                             xs::encode(xs::directory, 2, 3, "") +
                             xs::encode(xs::write, 3, 0, std::string("/b\0v", 4));
  for (const std::size_t chunk : {std::size_t{1}, std::size_t{5}, stream.size()}) {
    xs::Decoder d;
    std::vector<xs::Message> got;
    for (std::size_t i = 0; i < stream.size(); i += chunk) {
      d.feed(std::string_view(stream).substr(i, chunk));
      xs::Message m;
      while (d.next(m) == xs::Decoder::Status::message) got.push_back(m);
    }
    REQUIRE(got.size() == 3);
    CHECK(got[0].header.req_id == 1);
    CHECK(got[0].payload == std::string("/a\0", 3));
    CHECK(got[1].header.tx_id == 3);
    CHECK(got[1].payload.empty());
    CHECK(got[2].payload == std::string("/b\0v", 4));
    CHECK(d.buffered() == 0);
  }
}

TEST_CASE("xs_wire: a bad type or a payload over 4096 bytes fails the stream for good", "[xen]") {
  xs::Message m;
  SECTION("type past XS_TYPE_COUNT") {
    xs::Decoder d;
    d.feed(xs::encode_header({xs::type_count, 0, 0, 0}));
    CHECK(d.next(m) == xs::Decoder::Status::bad_header);
    d.feed(xs::encode(xs::read, 0, 0, std::string("/\0", 2)));
    CHECK(d.next(m) == xs::Decoder::Status::bad_header);
  }
  SECTION("oversized, known before the payload arrives") {
    xs::Decoder d;
    d.feed(xs::encode_header({xs::read, 0, 0, xs::payload_max + 1}));
    CHECK(d.next(m) == xs::Decoder::Status::oversized);
    CHECK(d.next(m) == xs::Decoder::Status::oversized);
  }
  SECTION("exactly 4096 is fine") {
    xs::Decoder d;
    d.feed(xs::encode(xs::write, 0, 0, std::string(xs::payload_max, '\0')));
    CHECK(d.next(m) == xs::Decoder::Status::message);
    CHECK(m.payload.size() == xs::payload_max);
  }
  SECTION("a short header is not an error yet") {
    xs::Decoder d;
    d.feed(xs::encode_header({xs::type_count, 0, 0, 0}).substr(0, xs::header_size - 1));
    CHECK(d.next(m) == xs::Decoder::Status::need_more);
  }
}
