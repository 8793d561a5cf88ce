#!/usr/bin/perl
# A bridge someone else wrote, in Perl, to the snakepit wire protocol (no snakepit code).
use strict;
use warnings;
use JSON::PP;

binmode(STDIN);
binmode(STDOUT);
$| = 1;
my $json = JSON::PP->new->utf8->canonical;

sub read_exactly {
    my ($n) = @_;
    my $buf = '';
    while (length($buf) < $n) {
        my $got = read(STDIN, $buf, $n - length($buf), length($buf));
        return undef if !$got;
    }
    return $buf;
}

while (defined(my $header = read_exactly(4))) {
    my $len = unpack('N', $header);
    my $req = $json->decode(read_exactly($len));
    my ($id, $cmd, $args) = ($req->{id}, $req->{command}, $req->{args} || {});
    my $res;
    if ($cmd eq 'ping') {
        $res = { id => $id, success => JSON::PP::true, result => { status => 'ok', runtime => 'perl' } };
    } elsif ($cmd eq 'reverse') {
        $res = { id => $id, success => JSON::PP::true, result => { text => scalar reverse($args->{text}) } };
    } elsif ($cmd eq 'add') {
        $res = { id => $id, success => JSON::PP::true, result => $args->{a} + $args->{b} };
    } else {
        $res = { id => $id, success => JSON::PP::false, error => "unknown command $cmd" };
    }
    my $body = $json->encode($res);
    print pack('N', length($body)) . $body;
}
